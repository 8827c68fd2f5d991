/**
 * One fuzz session against a real source engine: the fuzzer plays a hostile
 * destination. A real MigrationSource (the real addon: its regions tracked
 * with userfaultfd write-protection, its writers and, over TCP, its native
 * bulk writer, extra streams and demand thread) migrates a small service to a
 * real MigrationDestination in this process, through the interposer
 * (interposer.ts), which mutates one unit the destination sends: a frame, or
 * in a sealed session a record. The destination's service asks for pages
 * after the hand-off (PAGE_REQUEST), hints (WILL_NEED) and frees one
 * (FREED), so post-copy's messages are there to be mutated too.
 * Whatever the destination says, the source must:
 * - end: settle, or fail with an ERR_ code, within bounded time;
 * - run the service exactly once: resumed here if it failed before the
 *   hand-off (or the destination said it never got it), never resumed here
 *   once the destination runs it;
 * - keep its memory as the service left it, and send only pages of its
 *   regions with bytes they held (no memory past a region);
 * - when settled, have given the destination every byte.
 * A third forward the service's clients: the destination's service announces its ports (SERVICE, in post-copy or
 * once settled), which the source waits for after SETTLED and hands its forwarder (valid ports, or none in time).
 * Half the sessions whose link breaks after the hand-off lose the source's agent with it: a new agent takes the
 * migration over (MigrationSource.takeOver(), as after a crash), its exchange mutated, while the dead one dials nothing.
 */
import { once } from 'node:events'
import net from 'node:net'
import { PageBitmap } from '../../bitmap'
import type { NativeBinding } from '../../binding'
import { MigrationDestination } from '../../agent/destination/index'
import { DestPhase } from '../../agent/destination/machine'
import { MigrationSource } from '../../agent/source/index'
import type { MigrationMode, MigrationReport } from '../../agent/report'
import type { UffdMigrateError } from '../../errors'
import { SEALED } from '../../protocol/records'
import { Region } from '../../region'
import { FakeClock } from '../fake-clock'
import { Interposer } from './interposer'
import { FUZZ_TOKEN } from './link'
import { frameName, type Mutation } from './mutate'
import { Content, LAYOUT } from './content'
import type { SessionResult } from './session'
import { createWire, type FuzzEnd, until, type Wire, type WireKind } from './wire'

/** Where the destination's service listens when it forwards (a port, and a served server that listens on none). */
const SERVICE_PORTS = [4242, null]

/** Post-copy twice as often: its page requests are what the source parses most (the demand thread over TCP). */
const MODES: readonly MigrationMode[] = ['precopy', 'hybrid', 'postcopy', 'postcopy']

/** Fake time (timers move when the session moves them), with the loop's own setImmediate (a push loop yields on it). */
class LoopClock extends FakeClock {
  override setImmediate(fn: () => void): void {
    setImmediate(fn)
  }
}

/** The most units the destination sent in a session of each mode that settled without a recovery (the next session's mutation is drawn among them). */
const unitsSeen: Record<string, number> = {}

export class SourceFuzzSession {
  private readonly clock = new LoopClock()
  private readonly wire: Wire
  private readonly content: Content
  private readonly srcRegions: Region[]
  private readonly dstRegions: Region[]
  private readonly dest: MigrationDestination
  readonly mode: MigrationMode
  /** The service wrote its second version of the changed pages (between pre-copy rounds, before the pause). */
  private wroteChanged = false
  private pauses = 0
  private resumes = 0
  private restores = 0
  /** The destination's service announces its ports (guest.serve()): in post-copy, or once settled; undefined: never. */
  private readonly forwarding: 'postcopy' | 'settled' | undefined
  /** What the source's forwarder was handed (forwardTo), in order. */
  private readonly forwardedTo: (number | null)[][] = []
  /** Pages the destination's service freed in post-copy: their content is the service's business. */
  private readonly freed = LAYOUT.map(() => new Set<number>())
  private waitId = 1
  /** Over TCP, where each agent dials: the first's, then a new agent's (the dead one's dials are reset). */
  private readonly servers: net.Server[] = []
  /** The source's connections the interposer took (over TCP). */
  private readonly accepted = new Set<net.Socket>()

  constructor(private readonly binding: NativeBinding, private readonly rand: () => number, seed: number, readonly sealed = false, wire: WireKind = 'memory') {
    this.wire = createWire(wire)
    const ps = binding.pageSize
    this.content = new Content(seed, rand, ps)
    this.mode = MODES[Math.floor(rand() * MODES.length)]
    this.forwarding = this.mode !== 'precopy' && rand() < 1 / 3 ? (rand() < 1 / 2 ? 'postcopy' : 'settled') : undefined
    this.srcRegions = LAYOUT.map((n, i) => Region.create(`r${i}`, n * ps, binding))
    this.dstRegions = LAYOUT.map((n, i) => Region.create(`r${i}`, n * ps, binding))
    this.srcRegions.forEach((region, r) => {
      const mem = new Uint8Array(region.buffer)
      for (let p = 0; p < LAYOUT[r]; p++) if (!this.content.zero[r][p]) mem.set(this.content.page(r, p, 0), p * ps)
    })
    this.dest = new MigrationDestination(binding, this.dstRegions, LAYOUT.map((n) => new PageBitmap(n)), { token: FUZZ_TOKEN, bulkBufferBytes: 0, clock: this.clock }, {
      restore: async () => {
        this.restores++
        void this.serviceAsks()
        return this.clock.now()
      },
      settled: () => void (this.forwarding === 'settled' && this.dest.service.announce(SERVICE_PORTS)),
      ready: () => {},
      failed: () => {},
    })
  }

  /** The destination's units a session of this mode is expected to send (the mutation is drawn among them). */
  get frameCount(): number {
    return unitsSeen[this.mode] ?? 40
  }

  /** A page as the source's service left it. */
  private final(r: number, p: number): Buffer {
    const c = this.content
    return c.zero[r][p] ? Buffer.alloc(this.binding.pageSize) : c.page(r, p, this.wroteChanged && c.changed[r][p] ? 1 : 0)
  }

  /** pause()/takeFreed() as a service gives them: between rounds, before the pause, it writes its changed pages once. */
  private serviceWrites(): void {
    if (this.wroteChanged || this.pauses > 0) return
    this.wroteChanged = true
    const ps = this.binding.pageSize
    this.srcRegions.forEach((region, r) => {
      const mem = new Uint8Array(region.buffer)
      for (let p = 0; p < LAYOUT[r]; p++) if (this.content.changed[r][p]) mem.set(this.content.page(r, p, 1), p * ps)
    })
  }

  /**
   * After the hand-off the destination's service asks for pages (every other one, each on its own: a page request
   * apiece, each a frame to mutate), hints at a region, and frees a page.
   */
  private async serviceAsks(): Promise<void> {
    for (let i = 0; i < 50 && this.dest.phase !== DestPhase.POSTCOPY; i++) await this.wire.turns(1)
    if (this.dest.phase !== DestPhase.POSTCOPY) return
    const service = this.dest.service
    LAYOUT.forEach((n, r) => {
      for (let p = 0; p < n; p += 2) if (!this.content.zero[r][p]) service.waitFor(this.waitId++, r, p, 1)
    })
    service.willNeed(1, 0, LAYOUT[1])
    const last = LAYOUT[0] - 1
    this.freed[0].add(last)
    service.free(0, last, 1)
    if (this.forwarding === 'postcopy') service.announce(SERVICE_PORTS)
  }

  /**
   * Why a PAGES frame's bytes cannot be the source's memory (undefined: they can). Word by word, each from one of the
   * versions the service wrote: a page the writer sent while the service wrote it mixes both, and is sent again.
   */
  private checkPages(region: number, first: number, count: number, data: Buffer): string | undefined {
    const ps = this.binding.pageSize
    if (region >= LAYOUT.length || first + count > LAYOUT[region] || count === 0) return 'outside the regions'
    if (data.length !== count * ps) return `${data.length} bytes of data`
    for (let i = 0; i < count; i++) {
      const p = first + i, v0 = this.content.page(region, p, 0), v1 = this.content.page(region, p, 1), zero = this.content.zero[region][p]
      for (let w = 0; w < ps; w += 4) {
        const x = data.readUInt32LE(i * ps + w)
        if (x !== v0.readUInt32LE(w) && x !== v1.readUInt32LE(w) && !(zero && x === 0)) return `page ${p}: bytes the source never held at offset ${w}`
      }
    }
    return undefined
  }

  /** Mutates the destination's unit `at` with `kind`; see the file's comment. */
  async run(at: number, kind: Mutation): Promise<SessionResult> {
    // one post-copy session in three breaks the link after the hand-off, and mutates the recovery's exchange instead;
    // in half of those the source's agent dies with the break, and a new one takes the migration over
    const breakLink = this.mode !== 'precopy' && this.rand() < 1 / 3 ? { afterHandoff: Math.floor(this.rand() * 4), mutateAfter: Math.floor(this.rand() * 12) } : undefined
    const crash = breakLink !== undefined && this.rand() < 1 / 2
    const session = Array.from({ length: 24 }, () => Math.floor(this.rand() * 16).toString(16)).join('')
    type Outcome = { report?: MigrationReport; err?: UffdMigrateError }
    let outcome: Outcome | undefined, crashedIn: string | undefined, taken: Outcome | undefined
    const alive = (agent: number) => agent > 0 || crashedIn === undefined
    const interposer: Interposer = new Interposer(this.wire, (end) => void this.dest.accept(end, 'fuzzer'), {
      at: Math.max(0, at), kind, rand: this.rand, layout: LAYOUT, checkPages: (r, f, c, d) => this.checkPages(r, f, c, d),
      breakLink: breakLink && {
        ...breakLink,
        ...(crash ? {
          crashed: () => {
            crashedIn = source.phase
            void this.agent(interposer, session, 1).then(async (agent) => {
              agent.takeOver({ phase: crashedIn!, message: 'fuzz: the agent crashed', startedAtMs: 0 }).then((report) => (taken = { report }), (err: UffdMigrateError) => (taken = { err }))
            })
          },
        } : {}),
      },
    })
    const source = await this.agent(interposer, session, 0, alive)
    source.run().then((report) => (outcome = { report }), (err: UffdMigrateError) => (outcome = { err }))
    // (the dead agent ends too: its dials fail until its recovery gives up)
    const ended = await this.until(() => outcome !== undefined && (crashedIn === undefined || taken !== undefined))
    const last = crashedIn === undefined ? outcome : taken
    const result: SessionResult = { frames: interposer.destinationUnits, rejected: !!last?.err, codes: [], badPages: 0, end: 'settled', stream: interposer.roles.has('stream'), stray: interposer.stray,
      mutatedRecord: interposer.mutated?.type === SEALED, tookOver: crashedIn !== undefined,
      mutatedType: interposer.mutated && (interposer.mutated.type === SEALED ? 'record' : frameName(interposer.mutated.type)) }
    if (!ended) {
      result.hang = `the source did not end (phase ${source.phase}, destination ${this.dest.phase}${crashedIn ? ', a new agent took over' : ''})`
      if (source.cancel() === undefined) await this.until(() => outcome !== undefined, 10_000)
      return result
    }
    if (last!.err) {
      result.codes.push(last!.err.code ?? 'NO_CODE')
      // (failed: before the pause, the service never stopped)
      result.end = this.pauses === 0 ? 'failed' : this.resumes > 0 ? 'resumed' : 'kept'
    } else {
      result.end = crashedIn !== undefined ? 'took over' : (last!.report?.postcopy?.recoveries ?? 0) > 0 ? 'recovered' : 'settled'
      // (a recovery's exchange makes a session longer than most: drawn among those, a quarter of the mutations came too late)
      if (result.end === 'settled') unitsSeen[this.mode] = Math.max(unitsSeen[this.mode] ?? 0, interposer.destinationUnits)
    }
    result.serviceFault = this.serviceFault() ?? this.forwardFault()
    // (a SETTLED the source believed but the destination never sent, forged by the mutation: its memory is not complete)
    result.badPages = this.checkMemory(!last!.err && this.dest.phase === DestPhase.SETTLED)
    return result
  }

  /**
   * A source agent of the session: 0 the first, 1 the one that takes over after it died. alive(): a dead agent's
   * service calls reach nothing, and it dials nothing (its connections are reset).
   */
  private async agent(interposer: Interposer, session: string, n: number, alive: (agent: number) => boolean = () => true): Promise<MigrationSource> {
    const tcp = this.wire.kind === 'tcp'
    const to = tcp ? await this.listen(interposer, () => alive(n)) : 'memory:1'
    return new MigrationSource(this.binding, this.srcRegions, {
      to, session, mode: this.mode, ...(this.forwarding ? { forward: true, forwardWaitMs: 10_000 } : {}), token: FUZZ_TOKEN, encrypt: this.sealed, downtimeMs: 50, maxRounds: 3, connectTimeoutMs: 5000,
      recoveryTimeoutMs: 20_000, linkTimeoutMs: 10_000, requestTimeoutMs: 5000, prepaging: { strategy: 'bubble' }, pushLog: false,
      bulkBufferBytes: 0, postcopyNice: 0, streams: tcp ? 2 : 1, clock: this.clock,
      // in memory the fuzzer's pairs; over TCP the source dials (a dialer would keep the demand connection in JS)
      ...(tcp ? {} : {
        dial: async () => {
          const [mine, theirs] = await this.wire.pair()
          if (!alive(n)) this.wire.cut(theirs as FuzzEnd)
          else await interposer.join(theirs as FuzzEnd)
          return mine
        },
      }),
    }, {
      pause: async () => {
        if (alive(n)) this.pauses++
        return { state: new Uint8Array([1, 2, 3]) }
      },
      resume: () => void (alive(n) && this.resumes++),
      progress: () => {},
      forwardTo: (_host, ports) => void this.forwardedTo.push(ports),
      takeFreed: () => {
        this.serviceWrites()
        return []
      },
    })
  }

  /** Over TCP: where an agent dials (each connection joined by the interposer; reset once the agent died). */
  private async listen(interposer: Interposer, alive: () => boolean): Promise<string> {
    const server = net.createServer((s) => {
      s.on('error', () => {})
      this.accepted.add(s)
      if (!alive()) return void s.resetAndDestroy()
      void interposer.join(s)
    })
    this.servers.push(server)
    server.listen(0, '127.0.0.1')
    await once(server, 'listening')
    return `127.0.0.1:${(server.address() as net.AddressInfo).port}`
  }

  /** The service must run on exactly one host once the source ended (undefined: it does). */
  private serviceFault(): string | undefined {
    if (this.resumes > 1) return `resumed ${this.resumes} times`
    const here = this.pauses === 0 || this.resumes === 1, there = this.restores > 0
    if (here && there) return 'the service runs on both hosts (restored on the destination, resumed here)'
    if (!here && !there) return 'the service runs nowhere (paused here, never restored on the destination)'
    return undefined
  }

  /** The forwarder is handed only ports or nulls, whatever SERVICE said (undefined: so). */
  private forwardFault(): string | undefined {
    const bad = this.forwardedTo.find((ports) => !ports.every((p) => p === null || (Number.isInteger(p) && p >= 1 && p <= 65535)))
    return bad ? `the forwarder was handed ${JSON.stringify(bad)}` : undefined
  }

  /** Pages of the source that are not as its service left them, and (settled) the destination's that differ. */
  private checkMemory(settled: boolean): number {
    const ps = this.binding.pageSize
    let bad = 0
    const differs = (regions: Region[], r: number, p: number) => !Buffer.from(regions[r].buffer, p * ps, ps).equals(this.final(r, p))
    LAYOUT.forEach((n, r) => {
      for (let p = 0; p < n; p++) {
        if (differs(this.srcRegions, r, p)) bad++
        if (settled && !this.freed[r].has(p) && differs(this.dstRegions, r, p)) bad++
      }
    })
    return bad
  }

  /** Waits (moving the fake clock) until cond holds; false after a bounded time. */
  private until(cond: () => boolean, maxMs = 180_000): Promise<boolean> {
    return until(this.wire, this.clock, cond, maxMs)
  }

  close(): void {
    this.dest.close()
    this.wire.close()
    for (const server of this.servers) server.close()
    for (const s of this.accepted) s.destroy()
    for (const r of [...this.srcRegions, ...this.dstRegions]) r.release()
  }
}
