/**
 * The source-side fuzzer's man in the middle: it joins each connection the
 * source opens to a new connection to a real destination and passes the
 * bytes through, except one unit the destination sends (a frame, or a sealed
 * record: it has no keys), counted over the session's connections in order:
 * that one reaches the source mutated. It learns each connection's role from
 * the source's HELLO (so a mutation may move a frame to another connection of
 * the session), and it checks what the source sends: every PAGES frame must
 * lie inside the regions and carry bytes the source's memory held for those
 * pages (a source that answered a hostile request with memory past a region
 * would fail here).
 */
import { FrameDecoder, frameHeader } from '../../protocol/frames'
import { decodeControl, Msg } from '../../protocol/messages'
import type { Transport } from '../../protocol/transport'
import type { FuzzChannel, Mutated, Mutation } from './mutate'
import { mutate } from './mutate'
import type { FuzzEnd, Wire } from './wire'

/** Whole units (`u32 length | u8 type | payload`, a frame or a sealed record) out of a byte stream, as they came. */
function units(onUnit: (unit: Buffer) => void): FrameDecoder {
  // (the hosts are real and keep their own limits: this one only cuts)
  return new FrameDecoder((f) => onUnit(Buffer.concat([frameHeader(f.type, f.payload.length), f.payload])), 0xfffffffe)
}

export interface InterposerPlan {
  /** The destination's unit to mutate, counted from 0 over the session's connections (beyond the last: none). */
  at: number
  kind: Mutation
  rand: () => number
  layout: number[]
  /** Why the bytes of a PAGES frame the source sent cannot be its memory's (undefined: they can). */
  checkPages(region: number, first: number, count: number, data: Buffer): string | undefined
  /**
   * A break in post-copy, so that the recovery's exchange (its handshake, RECOVER_STATE) can be mutated: once the
   * source's HANDOFF passed, the destination's unit `afterHandoff` later is lost with a reset of every connection, and
   * the mutation hits the unit `mutateAfter` after it instead of `at`. crashed: the source's agent dies with the
   * break (called before the reset), and a new one takes over (source-session.ts).
   */
  breakLink?: { afterHandoff: number; mutateAfter: number; crashed?: () => void }
}

/** One connection: the source's end (the interposer writes the destination's units there) and the destination's. */
interface Joined {
  role: FuzzChannel | undefined
  toSource: FuzzEnd
  toDestination: FuzzEnd
}

export class Interposer {
  /** Units the destination sent so far (the mutated one included). */
  destinationUnits = 0
  /** The mutation as it went: the unit's type and connection, and what went instead. */
  mutated: { type: number; channel: FuzzChannel; instead: Mutated } | undefined
  /** What the source sent that it must not have (PAGES outside the regions, or bytes that are not its memory's). */
  readonly stray: string[] = []
  /** Every role a connection of the source had. */
  readonly roles = new Set<FuzzChannel>()
  /** The source's connections now open, by role (a recovery's replace a broken link's). */
  private readonly open = new Map<FuzzChannel, Joined>()
  /** The destination's units when the source's HANDOFF passed. */
  private handoffAt: number | undefined
  /** The planned break happened: every connection then open was reset. */
  broke = false

  constructor(private readonly wire: Wire, private readonly accept: (end: Transport) => void, private readonly plan: InterposerPlan) {}

  /** Joins a connection the source opened (its end here) to a new connection to the destination. */
  async join(fromSource: FuzzEnd): Promise<void> {
    const [toDestination, destinationEnd] = await this.wire.pair()
    this.accept(destinationEnd)
    const c: Joined = { role: undefined, toSource: fromSource, toDestination }
    const up = units((u) => this.fromSource(c, u)), down = units((u) => this.fromDestination(c, u))
    fromSource.on('data', (chunk: Buffer) => up.feed(chunk))
    toDestination.on('data', (chunk: Buffer) => down.feed(chunk))
    // either end's close (or reset) ends the other: a break reaches both hosts, as on a real path
    const end = (other: FuzzEnd) => () => {
      if (c.role && this.open.get(c.role) === c) this.open.delete(c.role)
      if (!other.destroyed) this.wire.cut(other)
    }
    fromSource.on('close', end(toDestination))
    toDestination.on('close', end(fromSource))
    fromSource.on('error', () => {})
    toDestination.on('error', () => {})
  }

  private fromSource(c: Joined, unit: Buffer): void {
    if (c.role === undefined && unit[4] === Msg.HELLO) {
      try {
        c.role = decodeControl(Msg.HELLO, unit.subarray(5)).role as FuzzChannel
        this.open.set(c.role, c)
        this.roles.add(c.role)
      } catch {
        // (the source's own HELLO is valid; nothing to learn otherwise)
      }
    }
    if (unit[4] === Msg.HANDOFF && this.handoffAt === undefined) this.handoffAt = this.destinationUnits
    if (unit[4] === Msg.PAGES && unit.length >= 17) {
      const region = unit.readUInt32BE(5), first = unit.readUInt32BE(9), count = unit.readUInt32BE(13)
      const why = this.plan.checkPages(region, first, count, unit.subarray(17))
      if (why) this.stray.push(`${c.role ?? '?'}: PAGES region ${region} pages ${first}+${count}: ${why}`)
    }
    if (!c.toDestination.destroyed) c.toDestination.write(unit)
  }

  private fromDestination(c: Joined, unit: Buffer): void {
    const n = this.destinationUnits++
    const cut = this.plan.breakLink
    if (cut && !this.broke && this.handoffAt !== undefined && n >= this.handoffAt + cut.afterHandoff) {
      this.broke = true
      this.plan.at = n + 1 + cut.mutateAfter
      cut.crashed?.()
      for (const j of this.open.values()) for (const end of [j.toSource, j.toDestination]) this.wire.cut(end)
      this.open.clear()
      return
    }
    // (eight CLOCK answers per session drew a quarter of the mutations: three in four pass to the next unit)
    if (n === this.plan.at && unit[4] === Msg.CLOCK && this.plan.rand() < 3 / 4) this.plan.at++
    if (n !== this.plan.at || c.role === undefined) {
      if (!c.toSource.destroyed) c.toSource.write(unit)
      return
    }
    const channels = [...this.open.keys()]
    const instead = mutate({ channel: c.role, type: unit[4], bytes: unit }, this.plan.kind, this.plan.rand, this.plan.layout, channels)
    this.mutated = { type: unit[4], channel: c.role, instead }
    const to = this.open.get(instead.channel)?.toSource ?? c.toSource
    for (const w of instead.writes) if (!to.destroyed && w.length) to.write(w)
  }
}
