/**
 * The service's side: Guest.start() maps the guest regions and starts the
 * agent's worker. On the source, migrate() (or the CLI through the control
 * socket) moves the service; on the destination (receive mode), start()
 * waits for the incoming migration and returns after the hand-off with the
 * state the source's pause() returned.
 */
import { EventEmitter } from 'node:events'
import { Worker } from 'node:worker_threads'
import { loadBinding, type NativeBinding } from './binding'
import { PageBitmap } from './bitmap'
import { ErrorCode, EXIT_MOVE_FAILED, UffdMigrateError } from './errors'
import { Region } from './region'
import { nowMs } from './stats'
import { randomBytes } from 'node:crypto'
import { type AgentToMain, type MainToAgent, type WireSourceOptions } from './agent/messages'
import type { AgentWorkerData } from './agent/worker-data'
import type { MigrationReport } from './agent/report'
import type { PreflightReport } from './agent/source/preflight'
import type { Progress } from './agent/source/index'
import type { Server } from 'node:net'
import { ControlServer, type MovedStatus, withoutControl } from './control'
import { Forwarder } from './forwarder'
import { rehearseForwarding } from './forward-rehearsal'
import { GuestRegion, regionOf } from './guest-region'
import { bandwidthLimits, guestRegions, type GuestOptions, type MigrateOptions, resolveAgentNice, resolveEncrypt, resolveSocketTuning, validateMigrateOptions } from './options'
import { receiveGuest } from './receive'
import { describeTracker } from './agent/tracker'
import { resolveTrackerSetting } from './agent/tracker-choice'
import { WaitBatch } from './wait-batch'
import { MigrationCalls } from './migration-calls'
import type { BandwidthLimits } from './agent/source/bandwidth'
import { AGENT_WORKER, AgentHandle, MAX_AGENT_RESTARTS, MAX_TAKEOVERS, type StartedStandby } from './agent-handle'
import { emitOrExit, exitWhenMoved } from './guest-exit'
import { pauseService } from './service-pause'
import { logLine } from './log'
import { SignalHold } from './signal-hold'

export { GuestRegion } from './guest-region'
export type { GuestOptions, MigrateOptions } from './options'
export { EXIT_MOVE_FAILED }

export class Guest extends EventEmitter {
  readonly regions: Record<string, GuestRegion> = {}
  /** True on the destination: the service continues from `state`. */
  readonly restored: boolean
  /** The state returned by pause() on the source (destination only). */
  readonly state: unknown
  /** Destination: resolves when every page is local. Source: resolved. */
  readonly settled: Promise<void>
  /** @internal */
  isSettledFlag = false
  private readonly agent: AgentHandle
  /** The agent a takeover starts (src/agent-handle.ts). */
  private readonly sourceAgent: AgentWorkerData
  /** Destination: its agent's data, for a standby agent (src/agent-handle.ts). */
  private readonly standbyData: AgentWorkerData | undefined
  private readonly list: GuestRegion[]
  /** The running migration; stoppedAtMs and pausing: the service is paused for it (the agent asked). */
  private migrating: { resolve: (r: MigrationReport) => void; reject: (e: Error) => void; wire: WireSourceOptions; startedAtMs: number; stoppedAtMs?: number; pausing?: Promise<void>; takeovers: number } | undefined
  private readonly calls = new MigrationCalls((m) => this.post(m), (held) => (held ? this.agent.ref() : !this.migrating && this.agent.unref()))
  /** @internal Past the hand-off this process holds pages only it has: a stop signal waits for the migration's end (status: held). */
  readonly signals = new SignalHold(() => this.close())
  /** Set once this guest moved away: the service runs at this address now. */
  private movedTo: string | undefined
  /** Moved, and this process ends once its forwarded clients were idle this long (undefined: the service keeps it). */
  private exitsAfterIdleMs: number | undefined
  private readonly forwarder = new Forwarder()
  /** The forwarding path's rehearsal of this migration (src/forward-rehearsal.ts), over before the service pauses. */
  private rehearsal: Promise<unknown> | undefined
  /** Why the last migration from here did not move the service (afterHandoff: it failed once the service ran there). */
  private lastFailure: { code: string; message: string; afterHandoff?: boolean } | undefined
  private control: ControlServer | undefined
  private readonly waitBatch = new WaitBatch((waits) => this.post({ type: 'wait', waits }))
  private failure: Error | undefined
  private lastProgress: Progress | undefined
  private closed = false
  /** The agent's worker died (a bug): nothing can migrate from this process any more. */
  private agentEnded: UffdMigrateError | undefined
  private readonly takeFailure: () => void
  /** receive mode: connections refused so far, by error code (status shows them). */
  refusals: Record<string, number> | undefined
  /** The id of the migration running from here, or of the last one (from here, or the one that brought it here): status. */
  migration: string | undefined

  private constructor(
    readonly name: string,
    private readonly opts: GuestOptions,
    init: { worker: Worker; sourceAgent: AgentWorkerData; binding: NativeBinding; regions: Region[]; received?: PageBitmap[]; state?: unknown; settled: Promise<void>; receiving?: AgentWorkerData; standby?: boolean; early?: StartedStandby },
  ) {
    super()
    // destination: this thread takes a failure past the hand-off (or closes) before the exit watch ends the process
    const exitWatch = init.receiving?.exitWatch
    this.takeFailure = () => exitWatch && init.binding.exitWatchTake?.(exitWatch)
    this.standbyData = process.env.UFFD_MIGRATE_STANDBY === '0' || !init.standby ? undefined : init.receiving // (0: no standby agent)
    this.agent = new AgentHandle(init.worker, (m) => this.onAgent(m), (err) => this.onAgentCrash(err), init.early)
    this.sourceAgent = init.sourceAgent
    this.restored = init.received !== undefined
    this.state = init.state
    this.settled = init.settled
    this.list = init.regions.map((r, i) => new GuestRegion(this, i, r, init.received?.[i]))
    for (const g of this.list) this.regions[g.name] = g
  }

  /** A bug in the agent: it fails the migration it ran (a destination's, when pages were still to come), never the service. */
  private onAgentCrash(err: Error): void {
    const run = this.migrating, paused = run?.stoppedAtMs !== undefined, unsettled = this.restored && !this.isSettledFlag
    const e = { code: ErrorCode.AGENT, message: `migration agent crashed: ${err.message}` }
    this.calls.agentLost(new UffdMigrateError(e.message, e.code))
    if (run && paused && run.takeovers < MAX_TAKEOVERS && !this.closed) return void this.takeOver(run, err)
    // a destination's standby took over (it logged it): it hears the open waits and the service's ports again
    if (!run && unsettled && !this.closed && this.agent.promote(this.standbyData)) return void (this.waitBatch.resend(), this.forwarder.serving && this.post({ type: 'serving', ports: this.forwarder.ports() }))
    // the service runs here, no migration has it paused: the one that ran (if any) fails, and a new agent takes the place
    if (!paused && !unsettled && !this.closed && this.agent.replacements < MAX_AGENT_RESTARTS) return this.restartAgent(e)
    // paused, and the new agent crashed too: nobody here can tell whether the service runs at the destination
    const where = run && paused ? `the service stays paused here: it may run on ${run.wire.to} now (ask \`uffd-migrate status\` there) before you restart it` : 'restart the service (it runs on) to move it'
    this.agentEnded = new UffdMigrateError(`${e.message}; no migration can start from this process now: ${where}`, ErrorCode.AGENT)
    // and the process must not end by itself: its memory may be the only copy of pages the service there lacks
    if (paused) {
      Object.assign(e, { message: this.agentEnded.message, runsOn: 'unknown' })
      setInterval(() => {}, 2 ** 30)
    }
    if (this.migrating || (this.restored && !this.isSettledFlag)) return this.onAgent({ type: 'failed', error: e })
    this.lastFailure = e
    logLine(this.name, 'agent-crashed', this.agentEnded.message, 'error', this.migration)
  }

  static async start(opts: GuestOptions): Promise<Guest> {
    const entries = guestRegions(opts)
    const agentNice = resolveAgentNice(opts.agentNice), sockets = resolveSocketTuning(), tracker = resolveTrackerSetting(opts.tracker)
    const binding = loadBinding()
    const regions = entries.map(([name, bytes]) => Region.create(name, bytes, binding))
    const receive = opts.receive ?? process.env.UFFD_MIGRATE_RECEIVE
    const encrypt = resolveEncrypt(opts.encrypt) // (receiving: the destination insists on sealed connections)
    const sourceAgent: AgentWorkerData = { role: 'source', regions: regions.map((r) => r.describe()), agentNice, name: opts.name, tracker, sockets, encrypt }
    if (receive) return Guest.startReceiving(opts, binding, regions, receive, sourceAgent)
    const worker = new Worker(AGENT_WORKER, { workerData: sourceAgent })
    worker.unref()
    const guest = new Guest(opts.name, opts, { worker, sourceAgent, binding, regions, settled: Promise.resolve() })
    guest.isSettledFlag = true
    if (opts.control !== false) guest.control = await ControlServer.start(guest)
    return guest
  }

  private static async startReceiving(opts: GuestOptions, binding: NativeBinding, regions: Region[], listen: string, sourceAgent: AgentWorkerData): Promise<Guest> {
    const r = await receiveGuest(opts, binding, regions, listen, sourceAgent)
    const guest = new Guest(opts.name, opts, { worker: r.worker, sourceAgent, binding, regions, received: r.received, state: r.state, settled: r.settled, receiving: r.workerData, standby: r.standby, early: r.early })
    guest.refusals = r.refusals
    guest.migration = r.migration
    guest.once('settled', () => r.settle())
    guest.once('failed', (e: Error) => r.settleFail(e))
    // The service resumes when start() returns: tell the agent when that is; then a standby agent starts (until settled)
    queueMicrotask(() => (guest.post({ type: 'resumed', atMs: nowMs() }), setImmediate(() => guest.standbyData && guest.agent.standBy(guest.standbyData))))
    if (opts.control !== false) guest.control = await ControlServer.start(guest).catch(withoutControl(opts.name))
    return guest
  }

  /** @internal */
  post(m: MainToAgent, transfer: ArrayBuffer[] = []): void {
    if (!this.closed) this.agent.post(m, transfer)
  }

  /** For `status`: where it moved, and what keeps this process meanwhile. */
  get moved(): MovedStatus | undefined {
    if (!this.movedTo) return undefined
    return { to: this.movedTo, forwarding: this.forwarder.serving ? this.forwarder.status() : undefined, exitsAfterIdleMs: this.exitsAfterIdleMs }
  }

  /**
   * One word for `status`: a migration's phase while one runs (connect, precopy, handoff, postcopy, recovering);
   * otherwise idle, settling (a destination receiving its memory), recovering (one whose link broke: linkBrokenBy),
   * settled, moved (it runs elsewhere now), cancelled (the last migration was cancelled; the service runs here), or
   * failed (a migration failed after its hand-off).
   */
  get phase(): string {
    if (this.failure) return 'failed'
    if (this.migrating) return this.lastProgress?.phase ?? 'connect'
    if (this.movedTo) return 'moved'
    if (this.agentEnded) return 'failed'
    if (this.restored && !this.isSettledFlag) return this.linkBrokenBy && !this.failure ? 'recovering' : 'settling'
    if (this.lastFailure?.code === ErrorCode.CANCELLED) return 'cancelled'
    if (this.lastFailure?.afterHandoff) return 'failed'
    return this.restored ? 'settled' : 'idle'
  }

  /** A destination whose link broke after the hand-off: the agent's line, until the source is back (status: brokenBy). */
  get linkBrokenBy(): string | undefined {
    return this.brokenBy
  }

  private brokenBy: string | undefined

  /** Why the last migration from here did not move the service (status --json: lastError). */
  get lastError(): { code: string; message: string } | undefined {
    return this.lastFailure && { code: this.lastFailure.code, message: this.lastFailure.message }
  }

  /** The dirty-page tracker a migration from here gets, and why (`status`); 'none' when this kernel has none. */
  get tracker(): string {
    return describeTracker(loadBinding(), this.opts.tracker)
  }

  get progress(): Progress | undefined {
    return this.lastProgress
  }

  /**
   * The same as `guest.regions[name].free(offset, length)`: the service no
   * longer uses the whole pages of this range (region by name or object).
   */
  free(region: string | GuestRegion, offset: number, length: number): void {
    regionOf(this.regions, region).free(offset, length)
  }

  /** The options as the agent takes them, for a migration with a fresh id; throws a bad option, or why none can start now. */
  private wireOptions(options: MigrateOptions): WireSourceOptions {
    if (this.agentEnded || this.closed) throw this.agentEnded ?? new UffdMigrateError(`guest '${this.name}' is closed (guest.close()): start a new one to migrate`, ErrorCode.INVALID_ARG)
    if (this.migrating) throw new UffdMigrateError('a migration is already running for this guest', ErrorCode.BUSY)
    if (this.movedTo) throw new UffdMigrateError(`this guest moved to ${this.movedTo} and no longer runs here: migrate it from there`, ErrorCode.BUSY)
    const settling = 'this guest is still settling (receiving its memory from the previous host); migrate it again once guest.settled resolves'
    if (this.restored && !this.isSettledFlag) throw new UffdMigrateError(settling, ErrorCode.BUSY)
    return { ...validateMigrateOptions(options, this.opts.token, this.opts.encrypt), forward: this.forwarder.serving, servesHttp: this.forwarder.servesHttp, session: randomBytes(12).toString('hex') }
  }

  /**
   * Would a migration with these options start now (`send --dry-run`)? The destination is reached and authenticated,
   * checks the region table and whether it can hold this guest, and nothing moves: resolves with what both sides
   * found, or rejects with the error that migration would have met. The service is never paused.
   */
  preflight(options: MigrateOptions): Promise<PreflightReport> {
    return this.calls.preflight(() => this.wireOptions(options))
  }

  /** Moves this service to the destination; resolves with the report once it settled there. */
  migrate(options: MigrateOptions): Promise<MigrationReport> {
    let wire: WireSourceOptions
    try {
      wire = this.wireOptions(options)
    } catch (err) {
      return Promise.reject(err)
    }
    this.rehearsal = this.forwarder.prepare() ? rehearseForwarding() : undefined
    return new Promise((resolve, reject) => {
      this.migrating = { resolve, reject, wire, startedAtMs: nowMs(), takeovers: 0 }
      this.migration = wire.session
      this.lastFailure = undefined
      this.agent.ref()
      this.post({ type: 'migrate', options: wire })
    })
  }

  /**
   * Cancels the running migration if it has not reached the hand-off (QEMU's migrate_cancel): the service runs on here
   * (resume() is called if it was paused), the destination is told and listens again, and migrate() rejects with
   * ERR_MIGRATION_CANCELLED. Resolves once it is cancelled; rejects with ERR_MIGRATION_CANCEL_REFUSED after the
   * hand-off (the service already runs on the destination) or ERR_INVALID_ARG when nothing runs.
   */
  cancel(): Promise<void> {
    return this.calls.cancel(this.migrating !== undefined)
  }

  /**
   * Changes the bandwidth limits of the running migration at once (QEMU's migrate-set-parameters max-bandwidth):
   * bytes a second, 0 for none; one not given stays. Resolves with the limits that hold now; rejects with
   * ERR_INVALID_ARG for a bad value or when no migration runs.
   */
  setBandwidth(limits: Pick<MigrateOptions, 'maxBandwidth' | 'maxPostcopyBandwidth'>): Promise<BandwidthLimits> {
    return this.calls.setBandwidth(this.migrating !== undefined, () => bandwidthLimits(limits))
  }

  /** @internal resolves when [first, first+count) of the region is local; the agent asks for it at once */
  waitLocal(region: number, first: number, count: number): Promise<void> {
    if (this.failure) return Promise.reject(this.failure)
    return this.waitBatch.wait(region, first, count)
  }

  private onAgent(m: AgentToMain): void {
    if (this.calls.take(m)) return // answers to cancel, set-bandwidth, preflight
    switch (m.type) {
      case 'pause':
        this.signals.arm(() => ({ guest: this.name, migration: this.migration, to: this.migrating?.wire.to ?? '?', phase: this.phase, pagesLeft: this.lastProgress?.pagesLeft ?? 0 }))
        return void pauseService(this.migrating, { rehearsal: this.rehearsal, holdClients: () => this.forwarder.hold(), pause: this.opts.pause, post: (m, t) => this.post(m, t) })
      case 'resume':
        if (this.migrating) this.migrating.stoppedAtMs = undefined
        this.opts.resume?.()
        this.forwarder.release() // held requests and connections reach the service again
        return
      case 'forwardTo':
        this.forwarder.forwardTo(m.ports.map((port) => (port === null ? undefined : { host: m.host, port })))
        return
      case 'progress':
        this.lastProgress = m.progress
        return void this.emit('progress', m.progress)
      case 'report': {
        const done = this.migrating
        this.migrating = undefined
        this.movedTo = m.report.to
        this.calls.moved(m.report.to)
        // counted before the emit, which removes once() listeners
        const kept = this.listenerCount('moved') > 0
        this.emit('moved', m.report)
        done?.resolve(m.report)
        // (a stop signal held meanwhile is raised now, unless this exit after its relayed clients went idle honours it)
        if (this.opts.exitOnMoved === false || kept) return this.signals.release()
        // the destination runs the service now; when this one serves, relay its clients until they moved too
        this.exitsAfterIdleMs = this.opts.forwardIdleMs ?? 2000
        return exitWhenMoved(this, m.report.to, this.forwarder, this.exitsAfterIdleMs)
      }
      case 'failed': {
        const err = Object.assign(new UffdMigrateError(m.error.message, m.error.code), m.error.afterHandoff ? { afterHandoff: true } : {}, m.error.runsOn ? { runsOn: m.error.runsOn } : {})
        if (this.migrating) {
          const done = this.migrating
          this.migrating = undefined
          this.agent.unref()
          this.calls.failed(err)
          this.lastFailure = m.error
          done.reject(err)
          if (m.error.afterHandoff) emitOrExit(this, this.opts.exitOnMoved !== false, 'moveFailed', err, 0, 'the service does not run here any more, and did not settle there')
          // (two agents crashed with it paused: where the service runs is unknown, and a held signal stays held)
          return void (this.agentEnded || this.signals.release())
        }
        // destination after the hand-off: this thread is not blocked in a fault (the exit watch ends the process otherwise)
        this.takeFailure()
        this.agent.dismiss()
        this.failure = err
        this.waitBatch.endAll(err)
        // the agent logged the failure, unless it was the agent that crashed
        if (err.code === ErrorCode.AGENT) logLine(this.name, 'agent-crashed', err.message, 'error', this.migration)
        // 1: guest.settled's own listener
        return emitOrExit(this, this.opts.exitOnMoved !== false, 'failed', err, 1, 'the service cannot go on here without the pages that did not arrive')
      }
      case 'sessionEnded':
        // receive mode: only the hand-off commits; this guest waits for the next source (the agent logged why)
        return
      case 'ready':
        return this.waitBatch.ready(m.ids)
      case 'recovering':
        // the link broke during post-copy; faults wait until the source is back (the agent logged it: this thread may be blocked)
        this.brokenBy = m.message
        return void this.emit('recovering', m.message)
      case 'linkBack':
        this.brokenBy = undefined
        return
      case 'settled':
        this.agent.dismiss()
        this.isSettledFlag = true
        this.brokenBy = undefined
        this.waitBatch.endAll()
        this.agent.unref()
        this.emit('settled')
        return
    }
  }

  /** The agent crashed while the service runs here (no migration, or one before its pause): a new agent for the next. */
  private restartAgent(e: { code: string; message: string }): void {
    logLine(this.name, 'agent-crashed', `${e.message}; a new agent takes its place (the service runs on here, and can move again)`, 'warn', this.migration)
    if (this.migrating) this.onAgent({ type: 'failed', error: e })
    else this.lastFailure = e
    void this.agent.replace(this.sourceAgent).then(() => !this.migrating && this.agent.unref())
  }

  /** The agent crashed with the service paused for a migration: a new one asks the destination what became of it. */
  private async takeOver(run: NonNullable<Guest['migrating']>, err: Error): Promise<void> {
    run.takeovers++
    logLine(this.name, 'agent-crashed', `migration agent crashed: ${err.message}; the service stays paused while a new agent asks ${run.wire.to} whether the hand-off arrived`, 'error', this.migration)
    await run.pausing // its answer went to the crashed agent; the new one must not resume the service before it returned
    await this.agent.replace(this.sourceAgent)
    const crash = { phase: this.lastProgress?.phase ?? 'handoff', message: err.message, startedAtMs: run.startedAtMs, stoppedAtMs: run.stoppedAtMs }
    this.post({ type: 'takeOver', options: run.wire, crash })
  }

  /**
   * Hands a listening server of the service to the guest: at a migration its socket stays open and its clients are
   * held, then relayed to the destination's service (which serve()s the same way); they see latency, never a refused
   * connection. Do not close it in pause(). The destination tells the source on which port it listens once it does.
   */
  serve(server: Server): void {
    this.forwarder.serve(server)
    if (!this.restored) return
    const announce = () => this.post({ type: 'serving', ports: this.forwarder.ports() })
    if (server.listening) announce()
    else server.once('listening', announce)
  }

  /** Stops the agent and the control socket; regions stay mapped until released. */
  async close(): Promise<void> {
    if (this.closed) return
    this.closed = true
    this.signals.release() // (no migration runs from a closed guest: a signal it held is raised)
    this.takeFailure()
    this.control?.close()
    await this.agent.terminate()
  }
}
