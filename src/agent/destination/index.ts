/**
 * The destination side of one migration, in the agent's worker: one state machine (machine.ts) fed by both connections'
 * frames. Pages go straight into the registered regions before the hand-off; after it faults become page requests and
 * pages go in with UFFDIO_COPY / ZEROPAGE. Settled = every page is local. Beside it, one file per concern.
 */
import type { NativeBinding, NativeUffd } from '../../binding'
import type { PageBitmap } from '../../bitmap'
import { ErrorCode, migrationError, type UffdMigrateError } from '../../errors'
import type { Channel, Transport } from '../../protocol/channel'
import type { Frame } from '../../protocol/frames'
import { type ChannelRole, peerError } from '../../protocol/handshake'
import { decodeControl, decodePages, decodeRuns, encodeControl, encodeRuns, field, Msg, RangeKind, type RegionLayout, RequestKind, uint } from '../../protocol/messages'
import type { Region } from '../../region'
import { postcopyBulkSocket, precopyBulkSocket } from '../bulk-socket'
import { type Clock, systemClock } from '../clock'
import { route } from '../message-table'
import { StateMachine } from '../state-machine'
import { Acceptor, DEFAULT_ACCEPTOR_LIMITS } from './accept'
import { BulkGate } from './bulk-gate'
import { BulkPath } from './bulk-path'
import { DemandPath } from './demand-path'
import { DEST_MESSAGES, DEST_TRANSITIONS, DestPhase, type DestinationHandlers } from './machine'
import type { DestinationHooks, DestinationOptions } from './hooks'
import { Placement } from './placement'
import { RecoveryWindow } from './recovery'
import { peerPostcopyNice } from '../yielding'
import { Requests, settledReport } from './requests'
import { ServiceCalls } from './service-calls'
import { acceptRegionTable } from './region-table'
import { type StuckLimits, Watchdog } from './watchdog'
import { type AgentWill, SessionNotes } from './takeover'

export { DestPhase } from './machine'
export type { DestinationHooks, DestinationOptions } from './hooks'
export class MigrationDestination implements DestinationHandlers {
  readonly machine = new StateMachine<DestPhase>('destination', DEST_TRANSITIONS, DestPhase.LISTENING)
  private readonly link: Acceptor
  private placement!: Placement
  private requests!: Requests
  private readonly gate: BulkGate
  private readonly watchdog: Watchdog
  private recovery!: RecoveryWindow
  private readonly demand: DemandPath
  private readonly bulkPath: BulkPath
  private readonly clock: Clock
  private readonly ps: number
  private readonly layout: RegionLayout[]
  private uffd: NativeUffd | undefined
  private linkTimeoutMs = 0 // from REGIONS: a silent peer fails a connection after this long (0: never)
  private cpuAtRegionsMs: number | undefined // this thread's CPU time when the session started (the report's CPU)
  readonly service: ServiceCalls // the service's calls (ready, willNeed, serve, free), through the worker
  private readonly notes = new SessionNotes() // what a successor needs (takeover.ts)

  constructor(
    private readonly binding: NativeBinding,
    private readonly regions: Region[],
    received: PageBitmap[],
    private readonly opts: DestinationOptions,
    private readonly hooks: DestinationHooks,
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
        for (const ch of this.link.channels) ch.sendError(err)
        this.endSession(err)
      },
    }, this.clock, { ...DEFAULT_ACCEPTOR_LIMITS, ...opts.limits })
    this.watchdog = new Watchdog(this.clock, {
      phase: () => machine.phase,
      complete: () => this.placement.complete,
      channels: () => this.link.channels,
      oldestRequestSinceMs: () => Math.min(this.requests.oldestRequestSinceMs() ?? Infinity, this.demand.oldestOpenMs(this.clock.now()) ?? Infinity),
      // a stuck source is a broken link: after the hand-off it must find it closed and come back (no ERROR then)
      broken: (err) => {
        if (this.phase === DestPhase.PRECOPY) for (const ch of this.link.channels) ch.sendError(err)
        this.linkBroke(err)
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
    if (role === 'demand') return this.demand.adopt(ch)
    if (role === 'stream') return this.bulkPath.addStream(ch, (err) => this.linkBroke(err))
    if (role === 'bulk') (this.phase === DestPhase.LISTENING ? precopyBulkSocket : postcopyBulkSocket)(ch, this.binding, this.opts.bulkBufferBytes)
    ch.onFrame((f) => this.onFrame(ch, role, f))
    ch.onClose((err) => this.onChannelClosed(err, ch))
    ch.detectSilence(this.binding.setSocketLiveness, this.linkTimeoutMs)
    ch.stallTimeoutMs = this.linkTimeoutMs
  }

  /** Every frame after the handshake: the message table says whether it is legal here and now. */
  private onFrame(ch: Channel, role: 'urgent' | 'bulk', f: Frame): void {
    try {
      const rule = route(DEST_MESSAGES, 'destination', this.phase, role, f.type)
      // pushed data in post-copy: a stretch of it keeps this loop busy for milliseconds, so faults (one read(),
      // usually EAGAIN) and the service's calls are taken before each frame; the gate may yield after it
      const pushed = role === 'bulk' && (f.type === Msg.PAGES || f.type === Msg.RANGES) && this.phase === DestPhase.POSTCOPY
      if (pushed) {
        this.uffd?.pollFaults()
        this.hooks.pollService?.()
      }
      rule.handle!(this, f)
      if (pushed && this.phase === DestPhase.POSTCOPY) this.gate.afterFrame()
    } catch (err) {
      ch.sendError(err as Error)
      this.fail(err as Error)
    }
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
    this.linkBroke(err)
  }

  /** The one rule for a broken link (a reset, or a stuck source): after the hand-off it is recovered, before it fatal to the session. */
  private linkBroke(err: Error): void {
    const recoverable = this.machine.is(DestPhase.POSTCOPY, DestPhase.RECOVERING) && (err as UffdMigrateError).code === ErrorCode.CONNECTION
    if (recoverable && this.recovery.timeoutMs > 0) return this.startRecovery(err)
    this.fail(err)
  }

  // ---- message handlers (named in machine.ts) -------------------------------

  onRegions(f: Frame): void {
    const limits = this.applyLimits(acceptRegionTable(f, this.regions, this.ps))
    this.cpuAtRegionsMs = this.binding.threadCpuMs?.()
    // Registered from the start: pre-copy pages go in with UFFDIO_COPY, then every missing page faults to us
    this.uffd = new this.binding.Uffd(0)
    const MISSING = this.binding.constants.UFFDIO_REGISTER_MODE_MISSING
    for (const r of this.regions) this.uffd.register(r.id, 0, r.sizeBytes, MISSING)
    this.readFaults(this.uffd, limits.precopyOnly)
    this.bulkPath.start(this.uffd, this.placement, this.link.bulk!)
    this.link.streamsAllowed = this.bulkPath.streamsFor(limits.streams)
    this.machine.transition(DestPhase.PRECOPY)
    const bulk = this.link.bulk!, ok = () => bulk.send(encodeControl(Msg.REGIONS_OK, { streams: this.link.streamsAllowed + 1, batch: true }))
    const preparing = this.hooks.incoming?.({ peer: this.link.sessionPeer, servesHttp: limits.servesHttp })
    if (preparing) void preparing.then(() => bulk === this.link.bulk && this.phase === DestPhase.PRECOPY && ok())
    else ok()
  }

  /** The source's stuck-peer limits (REGIONS, or a takeover's will) for the session's connections and the watchdog. */
  private applyLimits<L extends StuckLimits>(limits: L): L {
    this.notes.limits = limits
    this.linkTimeoutMs = limits.linkTimeoutMs
    for (const ch of this.link.channels) {
      ch.detectSilence(this.binding.setSocketLiveness, this.linkTimeoutMs)
      ch.stallTimeoutMs = this.linkTimeoutMs
    }
    this.watchdog.start(limits)
    return limits
  }

  /** The uffd's faults go to the native demand thread (with a demand connection, or detached: a takeover's) or to this loop. */
  private readFaults(uffd: NativeUffd, lazyZero: boolean, detached = false): void {
    if (!this.demand.start(uffd, this.placement, this.requests, detached)) uffd.startFaults((ev) => this.requests.onFaults(ev))
    this.placement.attach(uffd, lazyZero)
    this.requests.attach(uffd)
  }

  onClock(f: Frame): void {
    this.link.urgent!.send(encodeControl(Msg.CLOCK, { t0: field<number>(decodeControl(f.type, f.payload), 't0', 'number', 'CLOCK'), t1: this.clock.now() }))
  }

  onPages(f: Frame): void {
    this.placement.pages(decodePages(f.payload, this.layout, this.ps), this.phase !== DestPhase.PRECOPY)
  }

  onRanges(f: Frame): void {
    this.placement.ranges(decodeRuns(f.type, f.payload, this.layout), this.phase !== DestPhase.PRECOPY)
  }

  /** Applies the discard list, then resumes the service. */
  onHandoff(f: Frame): void {
    const handoffAtMs = this.clock.now(), m = decodeControl(f.type, f.payload)
    const state = field<Uint8Array>(m, 'state', 'bytes', 'HANDOFF')
    this.bulkPath.endStreams() // quiet since the source's barrier; nothing reaches the service's memory through them now
    this.placement.applyDiscard(field<unknown[]>(m, 'discard', 'array', 'HANDOFF'))
    const discardedAtMs = this.clock.now()
    this.recovery.timeoutMs = typeof m.recoveryTimeoutMs === 'number' && m.recoveryTimeoutMs > 0 ? Math.min(m.recoveryTimeoutMs, 24 * 3600_000) : 0
    this.machine.transition(DestPhase.POSTCOPY)
    this.notes.heldFd = this.uffd?.holdRegistrations?.() // the service runs on missing pages from now: only the settle ends the registrations
    if (this.link.bulk) postcopyBulkSocket(this.link.bulk, this.binding, this.opts.bulkBufferBytes)
    this.notes.postcopy = { nice: peerPostcopyNice(m.postcopyNice), forwarded: m.forward === true } // (in the will from here)
    this.hooks.restore(state).then(
      (resumedAtMs) => this.resumed(resumedAtMs, { handoffAtMs, discardedAtMs }),
      (err: Error) => {
        // The service did not start here: the source may (and does) resume its own.
        const e = migrationError(ErrorCode.HANDOFF, `the destination could not restore the hand-off state (${err.message}); the service did not start there`)
        this.link.bulk?.sendError(e)
        this.fail(e)
      },
    )
  }

  /** The service runs here: the restore's answer, or (handoff undefined) the main thread's word to an agent that took over before it heard. */
  resumed(resumedAtMs: number, handoff?: { handoffAtMs: number; discardedAtMs: number }): void {
    if (this.recovery.resumedAtMs !== undefined) return
    // the push is placed once the service runs (in the pause window it took CPU from the restore; faults never wait for it)
    this.bulkPath.resume()
    this.hooks.postcopy?.(this.notes.postcopy.nice, this.notes.postcopy.forwarded) // the rest is background work
    this.recovery.resumedAtMs = resumedAtMs
    // (recovering: RECOVER_STATE says it)
    if (this.phase === DestPhase.POSTCOPY) this.link.bulk?.send(encodeControl(Msg.RESUMED, { resumedAtMs, ...handoff }))
    this.hooks.milestone?.({ kind: 'resumed', peer: this.link.sessionPeer, afterHandoffMs: handoff && resumedAtMs - handoff.handoffAtMs, pagesLeft: this.placement.pagesLeft })
    this.checkSettled()
  }

  onSync(): void {
    this.link.bulk!.send(encodeControl(Msg.SYNC, {}))
  }

  onRequestDone(f: Frame): void {
    this.gate.done(uint(decodeControl(f.type, f.payload), 'kind', 'REQUEST_DONE', 1) as RequestKind)
  }

  onPeerError(f: Frame): never {
    throw peerError(f.payload)
  }

  // ---- recovery, and a new agent taking over (takeover.ts) ----------------------

  private startRecovery(err: Error): void {
    if (this.phase === DestPhase.POSTCOPY) this.machine.transition(DestPhase.RECOVERING)
    this.link.drop(err)
    this.demand.detach()
    this.bulkPath.detach()
    this.gate.reset()
    this.recovery.begin(err, (line) => this.hooks.recovering?.(line), (e) => this.fail(e))
  }

  /** Both connections are back: tell the source what arrived, ask again for what is still awaited. */
  onRecover(): void {
    // the source thinks the hand-off happened, but it never arrived (lost in flight, or this receiver restarted)
    if (this.phase === DestPhase.LISTENING) throw migrationError(ErrorCode.NO_SESSION, 'this destination has no migration to recover: the hand-off never arrived here (or the receiver restarted), the service does not run here')
    const pair = this.link.pair
    if (!pair) throw migrationError(ErrorCode.PROTOCOL, 'RECOVER before both connections were back')
    const settled = this.phase === DestPhase.SETTLED // the link broke as SETTLED left: the report again, nothing else to do
    if (!settled) {
      this.hooks.milestone?.({ kind: 'back', brokenMs: this.recovery.stop(), pagesLeft: this.placement.pagesLeft })
      this.watchdog.reset()
      this.machine.transition(DestPhase.POSTCOPY)
    }
    pair.bulk.send(encodeControl(Msg.RECOVER_STATE, { ...this.recovery.state(settled ? [] : this.placement.receivedBytes()), atMs: this.clock.now() }))
    if (this.service.ports) pair.bulk.send(encodeControl(Msg.SERVICE, { ports: this.service.ports }))
    if (settled) return
    // requests that were open (their replies may be lost): blocked threads wait on them
    this.requests.askAgain()
    this.bulkPath.attach(pair.bulk, this.uffd!, this.placement)
    this.checkSettled() // every page may be here already: nothing more will arrive to settle it (a takeover after the last)
  }

  /** What an agent that takes over from this one needs, once the service runs here and the source may come back. */
  will(): AgentWill | undefined {
    return this.notes.will(this.link.sessionId, this.link.sessionPeer, this.uffd, this.recovery)
  }

  /** The last agent crashed after the hand-off: go on from its held uffd and the shared received maps, and wait for the source to dial in again. */
  takeOver(will: AgentWill, listen: string): void {
    this.applyLimits(will.limits)
    const uffd = (this.uffd = new this.binding.Uffd(will.uffd.features, will.uffd.fd, will.uffd.ioctls))
    Object.assign(this.notes, { heldFd: uffd.holdRegistrations?.(), postcopy: { nice: will.postcopyNice, forwarded: will.forwarded } })
    this.readFaults(uffd, false, true)
    Object.assign(this.recovery, { timeoutMs: will.recoveryTimeoutMs, resumedAtMs: will.resumedAtMs })
    if (will.resumedAtMs !== undefined) this.hooks.postcopy?.(will.postcopyNice, will.forwarded) // (else at resumed())
    this.link.resume(will.session, will.peer)
    this.machine.transition(DestPhase.RECOVERING)
    for (const r of this.regions) uffd.wake(r.id, 0, r.sizeBytes) // threads blocked in faults the crashed agent read fault again, into this agent's reader
    this.startRecovery(migrationError(ErrorCode.AGENT, 'the migration agent that received it crashed; a new one took over'))
    this.listen(listen).catch((err: Error) => this.fail(err)) // (its port: the source dials it again)
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
    const report = settledReport(this.requests, this.placement, this.bulkPath.active, cpuMs)
    this.recovery.settledReport = report
    this.link.bulk?.send(encodeControl(Msg.SETTLED, report))
    this.hooks.milestone?.({ kind: 'settled', afterResumeMs: this.clock.now() - this.recovery.resumedAtMs, networkFaults: this.requests.stats.networkFaults, p99Us: this.requests.latencyReport().faultLatencyUs.p99 })
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

  private fail(err: Error): void {
    if (this.machine.is(DestPhase.FAILED, DestPhase.SETTLED)) return
    if (this.machine.is(DestPhase.LISTENING, DestPhase.PRECOPY)) return this.endSession(err)
    this.recovery.stop()
    this.watchdog.stop()
    this.bulkPath.close()
    this.machine.transition(DestPhase.FAILED)
    // a failure of this side's own (pages it could not place): the source hears why before the link goes
    if ((err as UffdMigrateError).code === ErrorCode.ABORTED) for (const ch of this.link.channels) ch.sendError(err)
    this.link.drop(err)
    this.link.stopListening()
    this.hooks.failed(err)
  }

  /** Only the hand-off commits: a session that ends before it leaves the guest as it was (regions empty, nothing registered), listening. */
  private endSession(err: Error): void {
    const hadSession = this.phase === DestPhase.PRECOPY || this.link.urgent !== undefined || this.link.bulk !== undefined
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
    if (hadSession) this.hooks.sessionEnded?.(err)
  }

  close(): void {
    this.watchdog.stop()
    this.link.close()
    this.bulkPath.close()
    this.demand.close()
    this.uffd?.close()
  }
}
