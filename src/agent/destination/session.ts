/**
 * The destination's session: its parts (the acceptor, placement, requests, the native demand and bulk paths, the
 * watchdog) and their lifecycle: connections adopted, a broken link recovered or fatal, settled, failed, ended before
 * the hand-off. The messages that drive it (the message table's handlers, recovery, a takeover) are index.ts's.
 */
import type { NativeBinding, NativeUffd } from '../../binding'
import type { PageBitmap } from '../../bitmap'
import { breaksLinkOnly, isFinding } from '../broken-link'
import type { Channel, Transport } from '../../protocol/channel'
import type { Frame } from '../../protocol/frames'
import type { ChannelRole } from '../../protocol/handshake'
import { encodeControl, encodeRuns, Msg, RangeKind, type RegionLayout } from '../../protocol/messages'
import type { Region } from '../../region'
import { detectSilence, postcopyBulkSocket, precopyBulkSocket } from '../socket-settings'
import { type Clock, systemClock } from '../clock'
import { StateMachine } from '../state-machine'
import { Acceptor, DEFAULT_ACCEPTOR_LIMITS } from './accept'
import { BulkGate } from './bulk-gate'
import { BulkPath } from './bulk-path'
import { DemandPath } from './demand-path'
import { DEST_TRANSITIONS, DestPhase } from './machine'
import type { DestinationHooks, DestinationOptions } from './hooks'
import { Placement } from './placement'
import { RecoveryWindow } from './recovery'
import { Requests, settledReport } from './requests'
import { ServiceCalls } from './service-calls'
import { type StuckLimits, Watchdog } from './watchdog'
import { SessionNotes } from './takeover'

/** The parts of one destination and their lifecycle; MigrationDestination (index.ts) handles the messages. */
export abstract class DestinationSession {
  readonly machine = new StateMachine<DestPhase>('destination', DEST_TRANSITIONS, DestPhase.LISTENING)
  protected readonly link: Acceptor
  protected placement!: Placement
  protected requests!: Requests
  protected readonly gate: BulkGate
  protected readonly watchdog: Watchdog
  protected recovery!: RecoveryWindow
  private readonly demand: DemandPath
  protected readonly bulkPath: BulkPath
  protected readonly clock: Clock
  protected readonly ps: number
  protected readonly layout: RegionLayout[]
  protected uffd: NativeUffd | undefined
  private linkTimeoutMs = 0 // from REGIONS: a silent peer fails a connection after this long (0: never)
  protected cpuAtRegionsMs: number | undefined // this thread's CPU time when the session started (the report's CPU)
  /** The session's REGIONS asked for a preflight only (send --dry-run): its end is told as one (sessionEnded). */
  protected preflightAsked = false
  readonly service: ServiceCalls // the service's calls (ready, willNeed, serve, free), through the worker
  protected readonly notes = new SessionNotes() // what a successor needs (takeover.ts)

  constructor(
    protected readonly binding: NativeBinding,
    protected readonly regions: Region[],
    received: PageBitmap[],
    protected readonly opts: DestinationOptions,
    protected readonly hooks: DestinationHooks,
  ) {
    this.clock = opts.clock ?? systemClock
    this.ps = binding.pageSize
    this.layout = regions.map((r) => ({ pageCount: r.pageCount }))
    this.demand = new DemandPath(binding, regions, (err) => this.linkBroke(err), this.clock)
    this.bulkPath = new BulkPath(binding, regions, { frame: (f) => this.link.bulk && this.onFrame(this.link.bulk, 'bulk', f), closed: (err) => this.link.bulk && this.onChannelClosed(err, this.link.bulk) })
    const machine = this.machine
    this.link = new Acceptor(opts.token, {
      get phase() { return machine.phase },
      adopt: (ch, role) => this.adopt(ch, role),
      refused: (m) => this.hooks.refused?.(m, this.link.refusals),
      expired: (err) => {
        this.link.tell(err)
        this.endSession(err)
      },
      quietSessionEndsInMs: () => this.watchdog.quietEndsInMs(),
    }, this.clock, { ...DEFAULT_ACCEPTOR_LIMITS, ...opts.limits }, opts.encrypt ?? false)
    this.watchdog = new Watchdog(this.clock, {
      phase: () => machine.phase,
      complete: () => this.placement.complete,
      channels: () => this.link.channels,
      oldestRequestSinceMs: () => Math.min(this.requests.oldestRequestSinceMs() ?? Infinity, this.demand.oldestOpenMs(this.clock.now()) ?? Infinity),
      // a stuck source is a broken link: after the hand-off it must find it closed and come back (no ERROR then)
      broken: (err) => this.linkBroke(err),
      keepalive: () => {
        const urgent = this.link.urgent
        if (urgent && !urgent.failed && !urgent.needsDrain) urgent.send(encodeControl(Msg.KEEPALIVE, {}))
      },
    })
    const self = this // (getters: the session's parts change under the calls)
    this.service = new ServiceCalls({ get phase() { return self.phase }, get requests() { return self.requests }, get urgent() { return self.link.urgent }, get bulk() { return self.link.bulk }, get hasUffd() { return self.uffd !== undefined }, ready: (ids) => this.hooks.ready(ids) })
    this.newSession(received)
    this.gate = new BulkGate(this.clock, (paused) => (paused ? this.link.bulk?.pauseReading() : this.link.bulk?.resumeReading()))
  }

  /** Fresh per-session state over the (cleared) received maps. */
  private newSession(received: PageBitmap[]): void {
    this.placement = new Placement(this.regions, received, this.ps, (region, first, count) => {
      this.requests.arrived(region, first, count)
      this.checkSettled()
    })
    this.requests = new Requests(this.regions, this.placement, this.ps, this.clock, {
      request: (type, region, runs, kind) => {
        if (type === Msg.PAGE_REQUEST && this.demand.active) return this.demand.ask(region, runs)
        const urgent = this.link.urgent
        if (!urgent) return // no link: in flight, asked again on recovery
        urgent.send(encodeRuns(type, kind, region, runs))
        if (type === Msg.PAGE_REQUEST) this.gate.opened(kind)
      },
      freed: (region, runs) => void this.link.bulk?.send(encodeRuns(Msg.FREED, RangeKind.FREE, region, runs)),
      ready: (ids) => this.hooks.ready(ids),
    })
    this.recovery = new RecoveryWindow(this.clock)
    this.linkTimeoutMs = 0
  }

  get phase(): DestPhase { return this.machine.phase }

  get pagesLeft(): number {
    return this.placement.pagesLeft
  }

  get received(): PageBitmap[] { // shared with the service's thread: isLocal() reads it
    return this.placement.received
  }

  listen(addr: string): Promise<number> {
    return this.link.listen(addr).then((port) => (this.notes.port = port))
  }

  /** An incoming connection (TCP from listen(), or an in-memory transport in tests). */
  accept(transport: Transport, peer?: string): Promise<void> {
    return this.link.accept(transport, peer)
  }

  private adopt(ch: Channel, role: ChannelRole): void {
    // an ERROR sent before the hand-off took effect here says so: a source that sent HANDOFF meanwhile resumes its
    // service (it kept it paused, committed, while it ran nowhere)
    ch.errorFields = () => (this.machine.is(DestPhase.LISTENING, DestPhase.PRECOPY) ? { serviceStarted: false } : undefined)
    if (role === 'demand') return this.demand.adopt(ch)
    if (role === 'stream') return this.bulkPath.addStream(ch, (err) => this.linkBroke(err, ch))
    if (role === 'bulk') (this.phase === DestPhase.LISTENING ? precopyBulkSocket : postcopyBulkSocket)(ch, this.binding, this.opts.bulkBufferBytes)
    ch.onFrame((f) => this.onFrame(ch, role, f))
    ch.onClose((err) => this.onChannelClosed(err, ch))
    detectSilence(ch, this.binding.setSocketLiveness, this.linkTimeoutMs)
    ch.stallTimeoutMs = this.linkTimeoutMs
  }

  private onChannelClosed(err: Error, ch: Channel): void {
    if (this.phase === DestPhase.SETTLED && (ch === this.link.bulk || ch === this.link.urgent)) {
      // the source hung up after the report, or the link broke as it left: thread and sockets go, the listener stays for
      // the recovery window (the source, or its crashed agent's successor, dials in to hear it again: onRecover)
      this.bulkPath.close()
      return this.link.drop(err)
    }
    if (this.machine.is(DestPhase.SETTLED, DestPhase.FAILED)) return
    if (ch !== this.link.urgent && ch !== this.link.bulk) return // a connection of a pair that already broke
    // (a native reader's refusal, a frame's length out of bounds; a record that failed its tag: before the hand-off the
    // source hears why on the other connection, where it would only see a reset; after it the link is recovered)
    this.linkBroke(err, ch)
  }

  /**
   * The one rule for an end this side did not choose: a broken link (a reset, a stuck source), a frame or stream that
   * broke the protocol (refused here, or by a native reader), a record that failed its tag, pages it could not place.
   * After the hand-off a broken link, or a protocol break within broken-link.ts's budget, is recovered, and the source
   * is not told: it sees the link end and dials back. Anything else ends the session (before the hand-off) or the
   * migration, and what this side found (broken-link.ts's isFinding) is told to the source: on `on`, the connection it
   * concerns, first, then on every other. On bulk alone, whose reading a native thread owns
   * and closes, it could be lost, and the source dialled back for its whole recovery window (one of five
   * real-process runs with four changed PAGES headers).
   */
  protected linkBroke(err: Error, on?: Channel): void {
    if (this.machine.is(DestPhase.POSTCOPY, DestPhase.RECOVERING) && this.recovery.timeoutMs > 0 && breaksLinkOnly(err, this.recovery.protocolBreaks)) return this.startRecovery(err)
    if (isFinding(err)) this.link.tell(err, on)
    this.fail(err)
  }

  /** The source's stuck-peer limits (REGIONS, or a takeover's will) for the session's connections and the watchdog. */
  protected applyLimits<L extends StuckLimits>(limits: L): L {
    this.notes.limits = limits
    this.linkTimeoutMs = limits.linkTimeoutMs
    for (const ch of this.link.channels) {
      detectSilence(ch, this.binding.setSocketLiveness, this.linkTimeoutMs)
      ch.stallTimeoutMs = this.linkTimeoutMs
    }
    this.watchdog.start(limits)
    return limits
  }

  /** The uffd's faults go to the native demand thread (with a demand connection, or detached: a takeover's) or to this loop. */
  protected readFaults(uffd: NativeUffd, lazyZero: boolean, detached = false): void {
    if (!this.demand.start(uffd, this.placement, this.requests, detached)) uffd.startFaults((ev) => this.requests.onFaults(ev))
    this.placement.attach(uffd, lazyZero)
    this.requests.attach(uffd)
  }

  protected startRecovery(err: Error): void {
    if (this.phase === DestPhase.POSTCOPY) this.machine.transition(DestPhase.RECOVERING)
    this.link.drop(err)
    this.demand.detach()
    this.bulkPath.detach()
    this.gate.reset()
    this.recovery.begin(err, (line) => this.hooks.recovering?.(line), (e) => this.fail(e))
  }

  // ---- settled and failed ------------------------------------------------------

  /** Settled: every page is local and the service runs here (a restore that fails must still be able to fail the migration). */
  checkSettled(): void {
    if (this.phase !== DestPhase.POSTCOPY || !this.placement.complete || this.recovery.resumedAtMs === undefined) return
    this.machine.transition(DestPhase.SETTLED)
    this.watchdog.stop()
    // everything with data is present; known-zero pages are filled by plain anonymous memory once unregistered
    this.closeUffd()
    this.requests.releaseAll()
    const cpuMs = this.cpuAtRegionsMs !== undefined ? this.binding.threadCpuMs!() - this.cpuAtRegionsMs + this.demand.cpuMs + this.bulkPath.cpuMs : undefined
    const report = settledReport(this.requests, this.placement, this.bulkPath.active, cpuMs, this.recovery.protocolBreaks)
    this.recovery.settledReport = report
    this.link.bulk?.send(encodeControl(Msg.SETTLED, report))
    this.hooks.milestone?.({ kind: 'settled', afterResumeMs: this.clock.now() - this.recovery.resumedAtMs, networkFaults: this.requests.stats.networkFaults, p99Us: this.requests.latencyReport().faultLatencyUs.p99, recoveries: this.recovery.outages, protocolBreaks: this.recovery.protocolBreaks })
    // keep listening a while: if the link broke as SETTLED left, the source dials in again to learn it (onRecover)
    if (this.recovery.timeoutMs > 0) this.clock.setTimeout(() => this.link.stopListening(), this.recovery.timeoutMs)
    else this.link.stopListening()
    this.hooks.settled()
  }

  private closeUffd(): void {
    this.demand.close() // its thread uses the uffd: joined first
    if (!this.uffd) return
    for (const r of this.regions) this.uffd.unregister(r.id, 0, r.sizeBytes)
    this.uffd.close()
    this.uffd = undefined
    this.placement.attach(undefined)
    this.requests.attach(undefined)
  }

  protected fail(err: Error): void {
    if (this.machine.is(DestPhase.FAILED, DestPhase.SETTLED)) return
    if (this.machine.is(DestPhase.LISTENING, DestPhase.PRECOPY)) return this.endSession(err)
    this.recovery.stop()
    this.watchdog.stop()
    this.bulkPath.close()
    // the native reader hands over its last events as it stops: the pages they placed may have completed the migration
    // (then it settled just now; seen in CI, the source-side fuzzer's sessions closing: settled to failed threw)
    if (this.machine.is(DestPhase.SETTLED)) return
    this.machine.transition(DestPhase.FAILED)
    this.link.drop(err)
    this.link.stopListening()
    this.hooks.failed(err)
  }

  /**
   * Only the hand-off commits: a session that ends before it leaves the guest as it was (regions empty, nothing
   * registered), listening. quiet: a preflight that was answered (its hook told it), not a session that failed.
   */
  protected endSession(err: Error, quiet = false): void {
    const hadSession = this.phase === DestPhase.PRECOPY || this.link.urgent !== undefined || this.link.bulk !== undefined
    const ended = { id: this.link.sessionId, preflight: this.preflightAsked }
    this.preflightAsked = false
    this.watchdog.stop()
    this.bulkPath.close()
    this.link.drop(err)
    this.link.forgetSession()
    this.closeUffd()
    for (const r of this.regions) r.discard(0, r.sizeBytes)
    this.placement.forget()
    this.gate.reset()
    this.newSession(this.placement.received)
    if (this.phase !== DestPhase.LISTENING) this.machine.transition(DestPhase.LISTENING)
    if (hadSession && !quiet) this.hooks.sessionEnded?.(err, ended)
  }

  close(): void {
    this.watchdog.stop()
    this.link.close()
    this.bulkPath.close()
    this.demand.close()
    this.uffd?.close()
  }

  /** Every frame after the handshake (index.ts: the message table). */
  protected abstract onFrame(ch: Channel, role: 'urgent' | 'bulk', f: Frame): void
}
