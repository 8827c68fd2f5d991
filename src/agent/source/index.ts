/**
 * The source side of one migration, in the agent's worker: one state machine (machine.ts) through connect, pre-copy
 * rounds, hand-off and post-copy until the destination says settled. The service's memory is kept until then.
 * Concerns live beside it: link.ts (dial, handshake, clock), sender.ts (what the destination holds, every page sent),
 * precopy.ts (rounds, hot pages, convergence), handoff.ts, postcopy.ts (push, requests, recovery), handoff-fate.ts
 * (whether a hand-off took effect, asked after a failure), report.ts, tracking.ts (the dirty-page tracker's life),
 * service-ports.ts (where the destination's service listens); hooks.ts: its options and how it reaches the service.
 * takeOver(): a new agent after one that crashed (src/agent-handle.ts).
 */
import { randomBytes } from 'node:crypto'
import type { NativeBinding } from '../../binding'
import { ErrorCode, migrationError, type UffdMigrateError } from '../../errors'
import type { Channel } from '../../protocol/channel'
import type { Frame } from '../../protocol/frames'
import { peerError } from '../../protocol/handshake'
import { decodeControl, Msg, type RegionLayout } from '../../protocol/messages'
import { parseAddress } from '../address'
import type { Region } from '../../region'
import { type Clock, systemClock } from '../clock'
import { type ChannelName, route } from '../message-table'
import type { MigrationReport, RoundReport } from '../report'
import { StateMachine } from '../state-machine'
import { Bandwidth, type BandwidthLimits } from './bandwidth'
import { prepareHandoff, sendHandoff } from './handoff'
import type { PausedService, SourceHooks, SourceOptions } from './hooks'
import { LAST_WORDS_MS, reply, SourceLink } from './link'
import { SOURCE_MESSAGES, SOURCE_TRANSITIONS, SourcePhase, type SourceHandlers } from './machine'
import { askFate, Fate, HandoffFate, reclaimAfterLoss, sayWhereItRuns } from './handoff-fate'
import { Postcopy, TAKEOVER_ASK_MS } from './postcopy'
import { runPrecopy } from './precopy'
import { regionsMessage, residentBytes } from './region-table'
import { buildReport, type ReportInputs } from './report'
import { Sender } from './sender'
import { RateWindow } from './rate-window'
import { ServicePorts } from './service-ports'
import { Tracking } from './tracking'

export { SourcePhase } from './machine'
export type { PausedService, Progress, SourceHooks, SourceOptions } from './hooks'

/** After a cancel, how long run() waits for the destination to hang up (it is listening again then). */
const CANCEL_HANGUP_WAIT_MS = 2000

export class MigrationSource implements SourceHandlers {
  readonly machine: StateMachine<SourcePhase>
  private readonly clock: Clock
  private readonly layout: RegionLayout[]
  private readonly sender: Sender
  readonly postcopy: Postcopy
  private readonly totalPages: number
  private readonly session: string
  private readonly servicePorts: ServicePorts
  private readonly bandwidth: Bandwidth
  private current: SourceLink | undefined
  private readonly tracking = new Tracking()
  private round = 0
  private progressTimer: unknown
  private readonly rate = new RateWindow()
  failure: Error | undefined
  /** Where the service runs: here until HANDOFF is on the wire, then as the destination says (handoff-fate.ts). */
  readonly fate = new HandoffFate()
  /** A new agent's takeOver(): until the destination answers, nobody here knows whether the hand-off arrived. */
  private takingOver = false
  /** Rejects when cancel() is taken: every wait before the hand-off races it. */
  private readonly cancelled: Promise<never>
  private cancelWith!: (err: Error) => void

  constructor(
    private readonly binding: NativeBinding,
    private readonly regions: Region[],
    private readonly opts: SourceOptions,
    private readonly hooks: SourceHooks,
  ) {
    this.clock = opts.clock ?? systemClock
    this.session = opts.session ?? randomBytes(12).toString('hex')
    this.servicePorts = new ServicePorts(opts.serviceHost ?? parseAddress(opts.to).host, hooks.forwardTo, this.clock, opts.linkTimeoutMs)
    this.cancelled = new Promise<never>((_, reject) => (this.cancelWith = reject))
    this.cancelled.catch(() => {})
    this.layout = regions.map((r) => ({ pageCount: r.pageCount }))
    this.totalPages = regions.reduce((n, r) => n + r.pageCount, 0)
    this.sender = new Sender(binding, regions)
    this.bandwidth = new Bandwidth({ precopyBytesPerSec: opts.maxBandwidth ?? 0, postcopyBytesPerSec: opts.maxPostcopyBandwidth ?? 0 })
    this.machine = new StateMachine('source', SOURCE_TRANSITIONS, SourcePhase.CONNECT, (_, to) => {
      if (this.bandwidth.enter(to)) this.current?.pace() // the hand-off is never limited
      this.emitProgress()
    })
    const source = this
    this.postcopy = new Postcopy(this.sender, this.layout, this.clock, opts, {
      get link() {
        return source.link
      },
      get failure() {
        return source.failure
      },
      reconnect: async () => (this.current = this.writeNatively(await SourceLink.open(this.binding, this.linkOptions, this.session))),
      recovering: () => this.machine.transition(SourcePhase.RECOVERING),
      fate: this.fate,
      resumeLink: () => {
        this.machine.transition(SourcePhase.POSTCOPY)
        return this.attachLink()
      },
    })
  }

  get phase(): SourcePhase {
    return this.machine.phase
  }

  /** The destination's address. */
  get to(): string {
    return this.opts.to
  }

  get link(): SourceLink {
    return this.current!
  }

  private get linkOptions() {
    return { ...this.opts, bandwidth: this.bandwidth }
  }

  /** The operator changed the bandwidth limits (set-bandwidth): they hold from now on, also in the phases to come. */
  setBandwidth(limits: Partial<BandwidthLimits>): BandwidthLimits {
    this.bandwidth.set(limits)
    this.current?.pace()
    return this.bandwidth.current
  }

  /**
   * Cancels a migration that has not reached the hand-off (QEMU's
   * migrate_cancel): the destination is told (ERROR ERR_MIGRATION_CANCELLED)
   * and goes back to listening, the service runs on here (resumed if it was
   * paused) and run() rejects with ERR_MIGRATION_CANCELLED. Returns why it
   * was refused, or undefined when taken.
   */
  cancel(): UffdMigrateError | undefined {
    if (this.takingOver && this.fate.is(Fate.UNKNOWN) && this.machine.is(SourcePhase.RECOVERING)) {
      return migrationError(ErrorCode.CANCEL_REFUSED, `cannot cancel: a new migration agent is asking ${this.opts.to} whether the hand-off arrived (the last one crashed); if it did not, the service resumes here`)
    }
    if (!this.fate.is(Fate.HERE)) {
      return migrationError(ErrorCode.CANCEL_REFUSED, `cannot cancel: the hand-off is done and the service already runs on the destination (${this.opts.to}); the source keeps its memory until the destination settles`)
    }
    if (this.machine.is(SourcePhase.FAILED, SourcePhase.SETTLED)) return migrationError(ErrorCode.CANCEL_REFUSED, `cannot cancel: the migration already ended (${this.phase})`)
    const err = migrationError(ErrorCode.CANCELLED, `migration to ${this.opts.to} cancelled in phase ${this.phase}${this.phase === SourcePhase.PRECOPY ? ` (round ${this.round})` : ''}, before the hand-off: the service runs on here`)
    this.failure ??= err
    this.current?.tell(err)
    this.cancelWith(err)
    return undefined
  }

  /** Bulk connections of the pre-copy rounds (the report's `streams`). */
  private streamsUsed = 1

  /**
   * REGIONS_OK: the destination reads BATCH (announced writes), and granted extra bulk streams: open them, each
   * written by a native writer, pages split between them.
   */
  private async onRegionsOk(ok: Frame): Promise<void> {
    const msg = decodeControl(ok.type, ok.payload)
    if (msg.batch === true) this.sender.announceBatches()
    const granted = msg.streams
    if (typeof granted !== 'number' || !Number.isInteger(granted) || granted < 2 || granted > this.opts.streams!) return
    const link = this.link
    const extra = await this.guard(link.openStreams(granted - 1))
    // (not expected: each stream got a writer as bulk did) they stay idle, and the destination closes them at HANDOFF
    if (!this.sender.useLanes(link.bulk, extra)) return
    this.streamsUsed = granted
    // a stream that breaks before the hand-off breaks the migration, like bulk; the destination closes them at HANDOFF
    // (this side must not close them first: a stream that ends before HANDOFF is read there ends the session)
    for (const ch of extra) ch.onClose((err) => link.streams.includes(ch) && this.fate.is(Fate.HERE) && this.cancelWith(this.failure ?? err))
  }

  /** The link's bulk connection is written by the native writer from now on, where the addon has it. */
  private writeNatively(link: SourceLink): SourceLink {
    this.sender.writeNatively(link.bulk)
    return link
  }

  /** Waits for p unless the migration is cancelled first (p's own later failure is observed, never unhandled). */
  private guard<T>(p: Promise<T>): Promise<T> {
    p.catch(() => {})
    return Promise.race([p, this.cancelled])
  }

  async run(): Promise<MigrationReport> {
    const t0 = this.clock.now()
    let paused = false
    let pausing: Promise<PausedService> | undefined
    this.progressTimer = setInterval(() => this.emitProgress(), 200)
    try {
      const cpuAtStartMs = this.binding.threadCpuMs?.()
      const opening = SourceLink.open(this.binding, this.linkOptions, this.session)
      // a link that opens after a cancel is closed at once
      opening.then((l) => (this.failure ? l.close() : undefined), () => {})
      this.current = this.writeNatively(await this.guard(opening))
      const bulk = this.link.bulk
      bulk.send(regionsMessage(this.binding, this.regions, this.opts, { nativeWriter: bulk.frameWriter !== undefined, resident: residentBytes(this.binding, this.regions) }))
      this.link.watchPeer() // the destination sends KEEPALIVE from REGIONS on (REGIONS_OK may wait for its service)
      await this.onRegionsOk(await this.guard(reply(bulk, Msg.REGIONS_OK)))
      const clock = await this.guard(this.link.syncClock(this.clock))
      const failed = this.guard(this.attachLink())
      const rounds: RoundReport[] = []
      this.machine.transition(SourcePhase.PRECOPY)
      const tracker = this.tracking.open(this.binding, this.regions, this.opts.tracker)
      const common = { regions: this.regions, bulk, sender: this.sender, tracker, clock: this.clock, mode: this.opts.mode, switchoverBytesPerSec: this.opts.switchoverBandwidth, takeFreed: () => this.hooks.takeFreed() }
      const pre = await Promise.race([runPrecopy({
        ...common, pageSize: this.binding.pageSize, downtimeMs: this.opts.downtimeMs, maxRounds: this.opts.maxRounds, sync: () => reply(bulk, Msg.SYNC), onRound: (r) => {
          this.round = r
          this.emitProgress()
        },
      }, rounds), failed])
      const prep = prepareHandoff(this.sender, this.opts.mode, pre.hot) // O(memory): before the pause window
      this.machine.transition(SourcePhase.HANDOFF)
      const pauseAt = this.clock.now()
      // from here a failure before the hand-off resumes the service here,
      // even when pause() itself failed half-way
      paused = true
      pausing = this.hooks.pause()
      const { state, stoppedAtMs, postedAtMs } = await Promise.race([pausing, failed])
      // the service ran on until its loop got to the request: the downtime starts when it stopped
      const stoppedAt = Math.min(Math.max(stoppedAtMs ?? pauseAt, pauseAt), this.clock.now())
      const marks: ReportInputs['marks'] = { postedAt: postedAtMs, pausedAt: this.clock.now() }
      let discarded = 0, missingAtHandoff = 0
      // after the commit a broken link is post-copy's to recover (below), even while HANDOFF is still leaving
      const handedOff = Promise.race([sendHandoff({
        ...common,
        recoveryTimeoutMs: this.opts.recoveryTimeoutMs,
        postcopyNice: this.opts.postcopyNice,
        forward: this.opts.forward === true,
        marks,
        commit: (d, missing) => {
          if (this.failure) throw this.failure // cancelled or broken while the last pages went: no hand-off
          this.fate.handedOff()
          discarded = d
          missingAtHandoff = missing
          this.machine.transition(SourcePhase.POSTCOPY)
        },
        handedOver: () => {
          if (this.opts.mode !== 'precopy') this.postcopy.start()
        },
      }, state, prep, rounds), failed])
      await handedOff.catch((err: UffdMigrateError) => {
        if (this.failure || !this.postcopy.recoverable(err)) throw err
      })
      // HANDOFF is out: deciding what to push next is background work from now on
      if (this.opts.mode !== 'precopy') this.hooks.postcopy?.()
      const postStart = this.clock.now()
      const [resumedAtDest, stats] = await this.postcopy.run(failed)
      this.sender.stopDemand()
      this.machine.transition(SourcePhase.SETTLED)
      await this.portsOfService()
      const report = buildReport({
        mode: this.opts.mode, to: this.opts.to, migration: this.session, regions: this.regions, pageSize: this.binding.pageSize, rounds, precopyStop: pre.stop, convergenceRate: pre.rate,
        t0, pauseAt, stoppedAt, marks, postStart, settledAt: this.clock.now(), resumedAtDest, clock, bytesOnWire: this.link.bytesWritten + this.link.bytesRead,
        sourceCpuMs: cpuAtStartMs === undefined ? undefined : this.binding.threadCpuMs!() - cpuAtStartMs + this.sender.nativeCpuMs + this.tracking.cpuMs,
        discarded, missingAtHandoff, stats, streams: this.streamsUsed, encrypted: this.link.encrypted, tracker: this.tracking.report(), bandwidthLimits: this.bandwidth.limited ? this.bandwidth.current : undefined, sender: this.sender, postcopy: this.postcopy, pushLog: this.opts.pushLog,
      })
      this.link.close()
      return report
    } catch (err) {
      throw await this.failed(err as Error, paused, pausing)
    } finally {
      clearInterval(this.progressTimer as NodeJS.Timeout)
      // a hand-off the destination never got (or refused): the service runs here again, and its next migration
      // registers the regions anew (a tracker kept for the exit made that fail with EBUSY: found by the soak)
      this.tracking.close(this.fate.mayRunThere)
    }
  }

  /**
   * A new agent, after the one that ran this migration crashed with the service paused here (src/agent-handle.ts):
   * whether HANDOFF reached the destination is not known here. It dials in with the migration's session as after a
   * break (RECOVER): RECOVER_STATE means the service runs there, and post-copy goes on from what arrived; NO_SESSION
   * means HANDOFF never arrived, and the service resumes here. startedAtMs, stoppedAtMs: the service's thread's clock.
   */
  async takeOver(crash: { phase: string; message: string; startedAtMs: number; stoppedAtMs?: number }): Promise<MigrationReport> {
    this.fate.handedOff() // until the destination says whether it got HANDOFF
    this.takingOver = true
    this.machine.transition(SourcePhase.RECOVERING)
    this.progressTimer = setInterval(() => this.emitProgress(), 200)
    const postStart = this.clock.now()
    try {
      const [resumedAtDest, stats] = await this.postcopy.takeOver(migrationError(ErrorCode.AGENT, `the migration agent crashed: ${crash.message}`))
      this.sender.stopDemand()
      this.machine.transition(SourcePhase.SETTLED)
      await this.portsOfService()
      const stoppedAt = crash.stoppedAtMs ?? postStart
      const report = buildReport({
        mode: this.opts.mode, to: this.opts.to, migration: this.session, regions: this.regions, pageSize: this.binding.pageSize, rounds: [], precopyStop: 'unknown (agent restarted)',
        t0: crash.startedAtMs, pauseAt: stoppedAt, stoppedAt, marks: {}, postStart, settledAt: this.clock.now(), resumedAtDest, clock: this.postcopy.recoverClock ?? { offsetMs: 0, rttMs: 0 },
        bytesOnWire: this.link.bytesWritten + this.link.bytesRead, sourceCpuMs: undefined, discarded: 0, missingAtHandoff: 0, stats, sender: this.sender, postcopy: this.postcopy, pushLog: this.opts.pushLog,
      })
      this.link.close()
      return { ...report, takeover: { crashedInPhase: crash.phase, message: crash.message } }
    } catch (err) {
      throw await this.failed(err as Error, true, undefined)
    } finally {
      clearInterval(this.progressTimer as NodeJS.Timeout)
    }
  }

  /** The migration failed: the service resumes here unless it may run on the destination; returns err, told so. */
  private async failed(err: Error, paused: boolean, pausing: Promise<PausedService> | undefined): Promise<Error> {
    // (the service runs here: the destination's reason, if on its way, is worth a wait; see lastWords())
    if (!paused && !this.failure && (err as UffdMigrateError).code === ErrorCode.CONNECTION) err = (await this.current?.lastWords(LAST_WORDS_MS)) ?? err
    err = this.failure ??= err
    this.sender.stopDemand()
    const cancelled = (this.failure as UffdMigrateError).code === ErrorCode.CANCELLED
    // HANDOFF went, RESUMED did not come, nobody answered: whether the service runs there is asked (handoff-fate.ts)
    if (this.fate.needsAsking && !(err as UffdMigrateError).fromPeer) {
      this.current?.close()
      await askFate({ open: () => SourceLink.open(this.binding, this.linkOptions, this.session), clock: this.clock, linkTimeoutMs: this.opts.linkTimeoutMs, forMs: Math.max(this.opts.recoveryTimeoutMs, TAKEOVER_ASK_MS), cause: err }, this.fate)
    } else if (!cancelled && (err as UffdMigrateError).code !== ErrorCode.CONNECTION) this.current?.tell(err) // (after the hand-off it fails at once, no recovery to wait for)
    if (!cancelled) this.current?.close()
    if (this.opts.onDestinationLost === 'resume' && !cancelled) await reclaimAfterLoss(this.fate, err, this.opts.linkTimeoutMs, this.clock)
    if (this.machine.canTransition(SourcePhase.FAILED)) this.machine.transition(SourcePhase.FAILED)
    // HANDOFF on the wire: the destination may run the service already; resuming here too would run it twice, unless it said it did not
    if (paused && this.fate.runsHere) {
      // a cancel while pause() runs: let it finish first, so that resume() comes after it
      if (pausing) await pausing.catch(() => {})
      this.hooks.resume()
    }
    sayWhereItRuns(err, this.fate)
    if (cancelled) await this.current?.closeAfterPeer(CANCEL_HANGUP_WAIT_MS)
    return err
  }

  /** Settled: the forwarder needs the destination service's ports; its service may start listening after it settled. */
  private async portsOfService(): Promise<void> {
    if (!this.opts.forward) return
    const { urgent, bulk } = this.link, broke = new Promise<void>((r) => (urgent.onClose(() => r()), bulk.onClose(() => r())))
    await this.servicePorts.wait(this.opts.forwardWaitMs ?? 10_000, broke, () => SourceLink.open(this.binding, this.linkOptions, this.session))
  }

  /** Routes the urgent and bulk connections' frames through the message table; the promise rejects when any connection breaks. */
  private attachLink(): Promise<never> {
    const { urgent, bulk, demand } = this.link
    // between HANDOFF and RESUMED a frame that breaks the protocol is a broken link (recovery asks whether the hand-off
    // arrived), and after it within broken-link.ts's budget: the destination is not told, so that it recovers with
    // this side instead of failing with the service it runs
    for (const ch of [urgent, bulk]) ch.tellsRefusal = (err) => !this.postcopy.recoverable(err)
    urgent.onFrame((f) => this.onFrame(urgent, 'urgent', f))
    bulk.onFrame((f) => this.onFrame(bulk, 'bulk', f))
    const failed = new Promise<never>((_, reject) => {
      const onErr = (err: Error) => reject(this.failure ?? err)
      urgent.onClose(onErr)
      bulk.onClose(onErr)
      demand?.onClose(onErr) // read by a native thread from the hand-off on; it fails the channel when the connection ends
    })
    failed.catch(() => {})
    return failed
  }

  /** Throws (and the Channel answers ERROR and fails) when the table does not allow the frame now. */
  private onFrame(_ch: Channel, role: ChannelName, f: Frame): void {
    const rule = route(SOURCE_MESSAGES, 'source', this.phase, role, f.type)
    if (!rule.handle) throw migrationError(ErrorCode.PROTOCOL, `unexpected ${f.type} outside its exchange`)
    rule.handle(this, f)
  }

  onService(f: Frame): void {
    this.servicePorts.onService(f)
  }

  onPeerError(f: Frame): never {
    const err = peerError(f.payload)
    if (!err.fromPeer) throw err // (malformed: a protocol error of this side's finding, not the destination's report)
    this.failure = err
    // only a destination that did not resume the service may have it resume here: it could not restore the state, or
    // it gave up before the hand-off took effect there (its ERROR crossed the HANDOFF this side had just sent)
    if (err.code === ErrorCode.HANDOFF || err.serviceStarted === false) this.fate.refused()
    this.postcopy.onPeerFailure(err)
    throw err
  }

  private emitProgress(): void {
    const bytes = this.current?.bytesWritten ?? 0
    const after = this.machine.is(SourcePhase.POSTCOPY, SourcePhase.RECOVERING)
    this.hooks.progress({
      phase: this.phase, round: this.round, bytesSent: bytes, bytesPerSec: this.rate.sample(this.clock.now(), bytes),
      pagesLeft: after ? this.sender.pagesLeft : this.sender.notAtDestination,
      totalPages: this.totalPages,
      ...(this.tracking.kind ? { tracker: this.tracking.kind } : {}),
      ...(this.phase === SourcePhase.RECOVERING ? { brokenBy: this.postcopy.brokenBy } : {}),
      ...(this.fate.is(Fate.HERE) ? {} : { serviceRunsOn: this.fate.serviceRunsOn }),
      ...(this.bandwidth.bytesPerSec ? { limitBytesPerSec: this.bandwidth.bytesPerSec } : {}),
    })
  }
}
