/**
 * One fuzz session against a real destination engine (the real addon:
 * mmap'd regions, a real userfaultfd, UFFDIO_COPY) over in-memory
 * connections and a fake clock. The fuzzer plays the source: it sends a valid
 * session's frames up to a chosen one, sends that one mutated (and a couple
 * of valid frames after it), records how the destination took it, then ends
 * the session as a real source would have to and checks every page:
 * - before the hand-off: it hangs up; the destination must listen again, and
 *   a correct migration from scratch must then settle with every page right;
 * - after it: it hangs up and comes back (RECOVER), sends what the
 *   destination says it lacks, and every page must be right once settled;
 *   if the destination failed instead, every page it holds must be right.
 * A third of the sessions are sealed (the fuzzer asks to encrypt): the same
 * mutations behind the record layer, and the record layer's own (records.ts).
 * Over TCP (wire.ts) the addon's threads parse it all, as in production: the
 * bulk reader, an extra stream's reader (round 0 of one region), and the
 * demand thread, which gets post-copy's replies.
 */
import { PageBitmap } from '../../bitmap'
import type { NativeBinding } from '../../binding'
import { MigrationDestination } from '../../agent/destination/index'
import { DestPhase } from '../../agent/destination/machine'
import type { UffdMigrateError } from '../../errors'
import { Channel } from '../../protocol/channel'
import { decodeControl, encodeControl, encodeRuns, Msg, pagesHeader, RangeKind } from '../../protocol/messages'
import { Region } from '../../region'
import { FakeClock } from '../fake-clock'
import { authFrame, FUZZ_TOKEN, FuzzLink, helloFrame, nextFrame, writeRaw } from './link'
import { frameName, type FuzzChannel, type Mutated, type Mutation, mutate, type ScriptFrame } from './mutate'
import { isRecordMutation, mutateRecords, type RecordMutation } from './records'
import { createWire, type FuzzEnd, until, type Wire, type WireKind } from './wire'
import { Content, LAYOUT } from './content'

export { FUZZ_TOKEN } from './link'

export interface SessionResult {
  /** Frames written, valid ones included. */
  frames: number
  /** The destination said no: an ERROR frame, a refused connection, an ended or failed session. */
  rejected: boolean
  /** Every code the destination gave (ERROR frames and hooks). */
  codes: string[]
  /** The session could not be brought to an end state. */
  hang?: string
  /** Pages whose bytes differ from the source's after the session (or held wrongly after a failure). */
  badPages: number
  /**
   * How the session ended: settled after a fresh migration, settled after recovery, failed, settled; the source side
   * (source-session.ts) also: failed before the hand-off with the service resumed here, failed after it with the
   * source's memory kept, settled by a new agent that took over after the first crashed.
   */
  end: 'fresh' | 'recovered' | 'failed' | 'settled' | 'resumed' | 'kept' | 'took over'
  /** Who read the bulk connection, as the SETTLED report says ('native': the addon's reader; 'js'): absent when none came. */
  bulkReceive?: string
  /** An extra bulk stream was open in some connection set of the session (over TCP). */
  stream: boolean
  /** The source side: the service ran on both hosts, or on neither, or resumed twice (what happened). */
  serviceFault?: string
  /** The source side: PAGES the source sent outside its regions or with bytes its memory never held. */
  stray?: string[]
  /** The source side: the mutated unit was a sealed record (what a path without the keys can do). */
  mutatedRecord?: boolean
  /** The type of the peer's unit that was mutated ('handshake', 'record'; absent: the session ended before it). */
  mutatedType?: string
  /** The source side: its agent crashed after the hand-off and a new one took over (MigrationSource.takeOver()). */
  tookOver?: boolean
}

export class FuzzSession {
  private readonly clock = new FakeClock()
  private readonly regions: Region[]
  private readonly dest: MigrationDestination
  private readonly content: Content
  private readonly hookCodes: string[] = []
  private settled = false
  private failed = false
  private frames = 0
  private sessionSeq = 0
  private readonly wire: Wire
  private readonly links: FuzzLink[] = []
  /** The ids of the ready() waits askForReplies() made. */
  private waitId = 1
  /** Over TCP, one session in ten sends the demand replies without waiting to be asked (a misbehaving source). */
  private readonly unasked: boolean
  /** The connections of the session that meets the mutation (not a fresh migration after it, nor a recovery's). */
  private mutated: FuzzLink | undefined

  constructor(private readonly binding: NativeBinding, private readonly rand: () => number, seed: number, readonly sealed = false, wire: WireKind = 'memory') {
    this.wire = createWire(wire)
    const ps = binding.pageSize
    this.content = new Content(seed, rand, ps)
    this.unasked = wire === 'tcp' && rand() < 0.1
    this.regions = LAYOUT.map((n, i) => Region.create(`r${i}`, n * ps, binding))
    const code = (e: Error) => this.hookCodes.push((e as UffdMigrateError).code ?? 'NO_CODE')
    this.dest = new MigrationDestination(binding, this.regions, LAYOUT.map((n) => new PageBitmap(n)), { token: FUZZ_TOKEN, bulkBufferBytes: 0, clock: this.clock }, {
      restore: async () => this.clock.now(),
      settled: () => (this.settled = true),
      ready: () => {},
      failed: (e) => {
        this.failed = true
        code(e)
      },
      refused: (m) => this.hookCodes.push(/\[(\w+)\]$/.exec(m)?.[1] ?? 'NO_CODE'),
      sessionEnded: code,
    })
  }

  /** Frames of the valid script (after the handshake). */
  get frameCount(): number {
    return this.script().frames.length
  }

  /** The valid frames of a whole session after the handshake, in order. */
  private script(): { frames: ScriptFrame[]; handoffAt: number } {
    const c = this.content, ps = this.binding.pageSize
    const out: ScriptFrame[] = []
    const push = (channel: FuzzChannel, type: number, bytes: Buffer) => out.push({ channel, type, bytes })
    const control = (channel: FuzzChannel, type: Msg, body: object) => push(channel, type, Buffer.concat(encodeControl(type, body)))
    const pages = (channel: FuzzChannel, r: number, first: number, list: Buffer[]) =>
      push(channel, Msg.PAGES, Buffer.concat([pagesHeader(r, first, list.length, ps), ...list]))
    // over TCP the source asks for an extra bulk stream, and round 0 of region 1 travels on it (its own reader
    // thread); region 0's pages stay on bulk, the only one to drop them (STALE), as lanes keep a page on one stream
    const tcp = this.wire.kind === 'tcp'
    const laneOf = (r: number): FuzzChannel => (tcp && r === 1 ? 'stream' : 'bulk')
    control('bulk', Msg.REGIONS, { linkTimeoutMs: 10_000, requestTimeoutMs: 5000, pageSize: ps, ...(tcp ? { streams: 2 } : {}), regions: this.regions.map((r) => ({ name: r.name, sizeBytes: r.sizeBytes })) })
    control('urgent', Msg.CLOCK, { t0: 1 })
    // round 0: the data pages in the first three quarters (version 0), every zero page as a run
    LAYOUT.forEach((n, r) => {
      const zeros: number[] = []
      for (let p = 0; p < n; p++) if (c.zero[r][p]) zeros.push(p, 1)
      if (zeros.length) push(laneOf(r), Msg.RANGES, encodeRuns(Msg.RANGES, RangeKind.ZERO, r, zeros))
      for (let p = 0; p < Math.floor((n * 3) / 4); p += 2) {
        const list = [p, p + 1].filter((q) => q < n && !c.zero[r][q]).map((q) => c.page(r, q, 0))
        if (list.length === 2) pages(laneOf(r), r, p, list)
        else if (list.length === 1) pages(laneOf(r), r, c.zero[r][p] ? p + 1 : p, list)
      }
    })
    control('bulk', Msg.ROUND_END, { round: 0 })
    // hybrid's drop pass: the changed pages of region 0 are dropped now (STALE), confirmed by SYNC; the discard
    // list names them again, which is harmless (a dropped page is missing already)
    const stale: number[] = []
    for (let p = 0; p < Math.floor((LAYOUT[0] * 3) / 4); p++) if (c.changed[0][p]) stale.push(p, 1)
    if (stale.length) push('bulk', Msg.RANGES, encodeRuns(Msg.RANGES, RangeKind.STALE, 0, stale))
    // the barrier before the pause: the stream's SYNC answered (send() waits for it), then bulk's
    if (tcp) control('stream', Msg.SYNC, {})
    control('bulk', Msg.SYNC, {})
    control('bulk', Msg.PRECOPY_END, {})
    // the hand-off: pages changed since round 0 are discarded and come again in post-copy
    const discard = LAYOUT.map((n, r) => {
      const runs: number[] = []
      for (let p = 0; p < Math.floor((n * 3) / 4); p++) if (c.changed[r][p]) runs.push(p, 1)
      const b = Buffer.alloc(runs.length * 4)
      runs.forEach((v, i) => b.writeUInt32LE(v, i * 4))
      return b
    })
    const handoffAt = out.length
    control('bulk', Msg.HANDOFF, { state: new Uint8Array([1, 2, 3]), discard, recoveryTimeoutMs: 60_000 })
    // post-copy: changed pages (as replies: on urgent, or over TCP on the demand connection, which the destination's
    // demand thread reads) and the last quarter (pushed on bulk)
    const replies: FuzzChannel = this.wire.kind === 'tcp' ? 'demand' : 'urgent'
    LAYOUT.forEach((n, r) => {
      for (let p = 0; p < n; p++) {
        if (c.zero[r][p]) continue
        if (p < Math.floor((n * 3) / 4) && c.changed[r][p]) pages(replies, r, p, [c.final(r, p)])
        else if (p >= Math.floor((n * 3) / 4)) pages('bulk', r, p, [c.final(r, p)])
      }
    })
    control('bulk', Msg.PUSH_END, {})
    return { frames: out, handoffAt }
  }

  private async connect(session: string): Promise<FuzzLink> {
    const link = await FuzzLink.open(this.wire, this.dest, session, this.sealed)
    this.links.push(link)
    return link
  }

  private async send(link: FuzzLink, f: ScriptFrame): Promise<void> {
    if (f.channel === 'demand') await this.askForReplies(link)
    const channel = this.on(link, f.channel), syncs = link.streamSyncs
    this.frames++
    link.writeOn(channel, f.bytes)
    if (f.type === Msg.REGIONS && this.wire.kind === 'tcp') await link.openStream()
    // (a source waits for the stream's answer before it pauses; a stream that broke gives none)
    if (channel === 'stream' && f.type === Msg.SYNC) for (let i = 0; i < 50 && link.streamSyncs === syncs; i++) await this.wire.turns(1)
  }

  /** Where a frame for `channel` goes: the stream's frames on bulk where no stream was granted (or it was refused). */
  private on(link: FuzzLink, channel: FuzzChannel): FuzzChannel {
    return link.has(channel) ? channel : 'bulk'
  }

  /**
   * Before the first reply on the demand connection: the destination's service asks (ready()) for the pages the
   * replies carry, as it would by touching them, and the fuzzer waits (boundedly) for its requests. A source
   * answers only what was asked; where no request comes (the hand-off was refused), or on the mutated link of an
   * `unasked` session, the replies go unasked, and may meet the hand-off's discard list as it is applied. (A fresh
   * migration after it is a correct source's: it asks.)
   */
  private async askForReplies(link: FuzzLink): Promise<void> {
    if ((this.unasked && link === this.mutated) || link.demandRequests > 0 || link.repliesAsked) return
    link.repliesAsked = true
    // (the hand-off just went out: its frame is read and handled on the destination's time)
    for (let i = 0; i < 50 && this.dest.phase === DestPhase.PRECOPY; i++) await this.wire.turns(1)
    if (this.dest.phase === DestPhase.POSTCOPY) {
      LAYOUT.forEach((n, r) => {
        for (let p = 0; p < Math.floor((n * 3) / 4); p++) if (this.content.changed[r][p]) this.dest.service.waitFor(this.waitId++, r, p, 1)
      })
    }
    for (let i = 0; i < 50 && link.demandRequests === 0; i++) await this.wire.turns(1)
  }

  /** Waits (moving the fake clock) until cond holds; false after a bounded time. */
  private until(cond: () => boolean, maxMs = 120_000): Promise<boolean> {
    return until(this.wire, this.clock, cond, maxMs)
  }

  /** A whole correct migration from a fresh session; the destination must be listening. */
  private async migrateCorrectly(): Promise<void> {
    const link = await this.connect(`good-${++this.sessionSeq}`)
    for (const f of this.script().frames) {
      await this.send(link, f)
      await this.wire.turns(1)
    }
  }

  /** Mutates frame `at` of the script (at = -1: the handshake) with `kind`; see the file's comment. */
  async run(at: number, kind: Mutation | RecordMutation): Promise<SessionResult> {
    const { frames } = this.script()
    let link: FuzzLink | undefined
    let blurred: Mutated['blurred']
    const ends: FuzzEnd[] = []
    if (at < 0) {
      // (a record mutation at the handshake: nothing is sealed yet, so a bit flip stands for it)
      ends.push(await this.handshakeMutated(isRecordMutation(kind) ? 'bitflip' : kind))
    } else {
      link = this.mutated = await this.connect(`fuzz-${++this.sessionSeq}`)
      ends.push(...link.ends)
      // a frame a turn, as a source that awaits its answers would write them: written at once, the urgent CLOCK
      // (read once the destination's regions are mapped) came after the bulk channel's HANDOFF, and every session
      // mutated after the hand-off failed on that instead of meeting its mutation
      for (let i = 0; i < at; i++) {
        await this.send(link, frames[i])
        await this.wire.turns(1)
      }
      await this.wire.turns()
      if (isRecordMutation(kind)) {
        const channel = this.on(link, frames[at].channel)
        const next = frames.slice(at + 1).find((f) => this.on(link!, f.channel) === channel)
        if (channel === 'demand') await this.askForReplies(link)
        for (const w of mutateRecords(link.sealerOf(channel)!, frames[at].bytes, next?.bytes, kind, this.rand)) link.writeRawOn(channel, w)
        this.frames++
      } else {
        const m = mutate({ ...frames[at], channel: this.on(link, frames[at].channel) }, kind, this.rand, LAYOUT, link.channels)
        if (m.channel === 'demand') await this.askForReplies(link)
        for (const w of m.writes) link.writeOn(m.channel, w)
        this.frames += m.frames
        blurred = m.blurred
      }
      // a couple of valid frames after it: a desynchronised stream must still fail cleanly
      for (let i = at + 1; i < Math.min(frames.length, at + 3); i++) await this.send(link, frames[i])
      await this.wire.turns(8)
    }
    const codes = [...this.hookCodes, ...(link?.codes ?? [])]
    const rejected = codes.length > 0
    const result: SessionResult = { frames: 0, rejected, codes, badPages: 0, end: 'settled', stream: false, mutatedType: at < 0 ? 'handshake' : frameName(frames[at].type) }
    // end it as a source would: hang up (an authenticated half-session must not keep the slot), then come back or start over
    for (const t of ends) this.wire.cut(t)
    await this.wire.turns()
    const phase = this.dest.phase as DestPhase
    if (this.settled) result.end = 'settled'
    else if (phase === DestPhase.LISTENING || phase === DestPhase.PRECOPY) {
      if (!(await this.until(() => this.dest.phase === DestPhase.LISTENING))) result.hang = `did not listen again (phase ${this.dest.phase})`
      else {
        await this.migrateCorrectly()
        result.end = 'fresh'
      }
    } else if (phase === DestPhase.RECOVERING) {
      await this.recover()
      result.end = 'recovered'
    } else if (phase !== DestPhase.FAILED) result.hang = `phase ${this.dest.phase} after the hang-up`
    if (!result.hang && !this.failed && !(await this.until(() => this.settled || this.failed))) result.hang = `did not settle (phase ${this.dest.phase})`
    if (this.failed) result.end = 'failed'
    // (a fresh migration must have written every page again, blurred ones too)
    result.badPages = this.checkPages(result.end === 'fresh' ? undefined : blurred)
    result.frames = this.frames
    const said = this.links.map((l) => l.settledReport?.bulkReceive).filter((v) => typeof v === 'string')
    if (said.length) result.bulkReceive = said[said.length - 1] as string
    result.stream = this.links.some((l) => l.has('stream'))
    return result
  }

  /** Comes back after the hang-up: RECOVER, then every page the destination lacks. */
  private async recover(): Promise<void> {
    const link = await this.connect(`fuzz-${this.sessionSeq}`)
    this.frames++
    link.writeOn('bulk', Buffer.concat(encodeControl(Msg.RECOVER, {})))
    const state = await nextFrame(this.wire, link.bulk)
    if (state.type !== Msg.RECOVER_STATE) throw new Error(`fuzzer: expected RECOVER_STATE, got ${state.type}`)
    const got = (decodeControl(state.type, state.payload).received as Uint8Array[]).map((b, i) => {
      const m = new PageBitmap(LAYOUT[i])
      m.words.set(new Uint32Array(b.buffer.slice(b.byteOffset, b.byteOffset + Math.min(b.byteLength, m.words.byteLength))))
      return m
    })
    const ps = this.binding.pageSize
    LAYOUT.forEach((n, r) => {
      for (let p = 0; p < n; p++) {
        if (got[r]?.has(p)) continue
        this.frames++
        if (this.content.zero[r][p]) link.writeOn('bulk', encodeRuns(Msg.RANGES, RangeKind.ZERO, r, [p, 1]))
        else link.writeOn('bulk', Buffer.concat([pagesHeader(r, p, 1, ps), this.content.final(r, p)]))
      }
    })
    this.frames++
    link.writeOn('bulk', Buffer.concat(encodeControl(Msg.PUSH_END, {})))
  }

  /** A handshake whose HELLO or AUTH is mutated; the destination must refuse it with a code, or accept a still-valid one. */
  private async handshakeMutated(kind: Mutation): Promise<FuzzEnd> {
    const [a, b] = await this.wire.pair()
    void this.dest.accept(b, 'fuzzer')
    const ch = new Channel(a, 'urgent')
    const nonce = Buffer.alloc(32, 9)
    const session = `hs-${++this.sessionSeq}`
    const hello: ScriptFrame = { channel: 'urgent', type: Msg.HELLO, bytes: helloFrame('urgent', session, nonce, this.sealed) }
    const mutateAuth = this.rand() < 0.5
    if (!mutateAuth) {
      const m = mutate(hello, kind, this.rand, LAYOUT)
      for (const w of m.writes) writeRaw(a, w)
      this.frames += m.frames
    } else {
      writeRaw(a, hello.bytes)
      this.frames++
      const reply = await nextFrame(this.wire, ch).catch(() => undefined)
      if (reply?.type === Msg.HELLO) {
        const auth: ScriptFrame = { channel: 'urgent', type: Msg.AUTH, bytes: authFrame('urgent', session, decodeControl(reply.type, reply.payload), nonce, this.sealed) }
        const m = mutate(auth, kind, this.rand, LAYOUT)
        for (const w of m.writes) writeRaw(a, w)
        this.frames += m.frames
      }
    }
    await this.wire.turns(8)
    return a
  }

  /** Pages that differ from the source's final content (settled), or held wrongly (failed). */
  private checkPages(blurred?: Mutated['blurred']): number {
    if (!this.settled) this.dest.close() // the uffd goes: missing pages read zero, nothing blocks
    let bad = 0
    this.regions.forEach((region, r) => {
      const mem = new Uint8Array(region.buffer)
      const held = this.dest.received[r]
      for (let p = 0; p < LAYOUT[r]; p++) {
        const got = mem.subarray(p * this.binding.pageSize, (p + 1) * this.binding.pageSize)
        if (this.settled || held.has(p)) {
          const isBlurred = blurred && r === blurred.region && p >= blurred.first && p - blurred.first < blurred.count
          if (!isBlurred && !Buffer.from(got).equals(this.content.final(r, p))) bad++
        } else if (got.some((x) => x !== 0)) bad++
      }
    })
    return bad
  }

  close(): void {
    this.dest.close()
    this.wire.close()
    for (const r of this.regions) r.release()
  }
}
