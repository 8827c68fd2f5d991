/**
 * The agent's worker thread (started by worker.ts). It owns the uffd, the tracker and
 * the sockets; the service's main thread talks to it with messages only, so
 * the agent keeps running while the main thread is blocked in a fault. The
 * environment is read here, at the process boundary, and passed down.
 */
import { readFileSync } from 'node:fs'
import { type MessagePort, parentPort, receiveMessageOnPort, workerData } from 'node:worker_threads'
import { loadBinding } from '../binding'
import { PageBitmap } from '../bitmap'
import { ErrorCode, EXIT_MOVE_FAILED, UffdMigrateError } from '../errors'
import { Region } from '../region'
import { nowMs } from '../stats'
import { DestPhase, MigrationDestination } from './destination/index'
import { type AgentToMain, type MainToAgent, type TakeoverCause, type WireSourceOptions, withOwnState } from './messages'
import { MigrationSource, type PausedService, type SourceOptions } from './source/index'
import { preflight } from './source/preflight'
import { agentTrouble, destinationLine, destinationTrouble, sourceLine } from './log-lines'
import { warmLinkCode } from './warm-up'
import type { AgentWill } from './destination/takeover'
import type { AgentWorkerData } from './worker-data'
import type { BandwidthLimits } from './source/bandwidth'
import { Yielding } from './yielding'
import { deferredLogLine, type LogEvent, type LogLevel, logLine } from '../log'
import { memoryHeadroom } from '../memory-headroom'

/** The destination's milestones as log events. */
const MILESTONE_EVENTS = { began: 'incoming', resumed: 'resumed', back: 'link-back', settled: 'settled', preflight: 'preflight' } as const satisfies Record<string, LogEvent>

const port = parentPort!
const data = workerData as AgentWorkerData
const binding = loadBinding()
// a destination's end is watched before it makes its uffd and threads: their cleanup runs before the watch's (see there)
if (data.role === 'destination' && data.exitWatch) binding.exitWatchBind?.(data.exitWatch)
const regions = data.regions.map((d) => Region.open(d, binding))
// This thread only: it pushes, installs and reads faults (on its own loop).
if (data.agentNice) binding.setThreadNice(data.agentNice)
// post-copy's nice value for this thread, from the hand-off until settled
const yielding = new Yielding((nice) => binding.setThreadNice(nice), data.agentNice)
/** Post-copy is over (settled or failed): this thread's own nice again, where the kernel allows it. */
const stopYielding = () => {
  if (!yielding.leave()) log('still-yielding', agentTrouble.stillYielding(yielding.nice), 'warn')
}
const { bulkBufferBytes, pushUnsentBytes } = data.sockets
const post = (m: AgentToMain, transfer: ArrayBuffer[] = []) => port.postMessage(m, transfer)
/** The migration this agent runs, either side (its session: both hosts log it), for its lines; one at a time. */
let migrationId: string | undefined
/** One line on stderr for the operator, written by this thread (src/log.ts), about migration `about` (none: another peer's). */
const logAbout = (about: string | undefined) => (event: LogEvent, line: string, level: LogLevel = 'info') => logLine(data.name ?? '?', event, line, level, about)
/** The same, about the migration running. */
const log = (event: LogEvent, line: string, level: LogLevel = 'info') => logAbout(migrationId)(event, line, level)
/** A guest still receiving its memory cannot move on (a migration, a preflight): why, or undefined. */
const stillSettling = () => incoming && incoming.phase !== DestPhase.SETTLED
  ? { code: ErrorCode.BUSY, message: 'this guest is still settling (receiving its memory); migrate it again once guest.settled resolves' }
  : undefined
const errorOut = (err: unknown) => ({
  message: (err as Error).message,
  code: (err as UffdMigrateError).code ?? ErrorCode.GENERIC,
  ...((err as { afterHandoff?: boolean }).afterHandoff ? { afterHandoff: true } : {}),
  ...((err as { runsOn?: 'unknown' }).runsOn ? { runsOn: 'unknown' as const } : {}),
})
const errorIn = (e: { code: string; message: string }) => new UffdMigrateError(e.message, e.code)

/** A question to the main thread (pause, restore) whose answer comes back as a message. */
class MainThreadCall<T> {
  /** Oldest first: the main thread answers in the order it was asked (a new session may ask before an old answer came). */
  private readonly waiters: { resolve: (v: T) => void; reject: (e: Error) => void }[] = []

  ask(m: AgentToMain, transfer: ArrayBuffer[] = []): Promise<T> {
    return new Promise((resolve, reject) => {
      this.waiters.push({ resolve, reject })
      post(m, transfer)
    })
  }

  get waiting(): boolean {
    return this.waiters.length > 0
  }

  answer(value: T): void {
    this.waiters.shift()?.resolve(value)
  }

  refuse(error: { code: string; message: string }): void {
    this.waiters.shift()?.reject(errorIn(error))
  }
}

// A bug in this thread: it says so itself (the service's thread may be blocked in a fault and never see the worker's
// 'error' event); then the worker ends, and a destination's exit watch counts down.
process.on('uncaughtExceptionMonitor', (err) => log('agent-crashed', agentTrouble.crashed(err), 'error'))

/**
 * After a failure past the hand-off, the service's thread has this long to take it (exitWatchTake); a thread that does
 * not is blocked in a fault that nothing can resolve any more, and the exit watch ends the process. The watch is a
 * native thread: it also counts down when this thread ends (a bug in the agent) before every page arrived.
 */
const FAILED_ANSWER_MS = 3000
const notTaken = (what: string) => deferredLogLine(data.name ?? '?', 'exiting', destinationTrouble.notTaken(what, FAILED_ANSWER_MS, EXIT_MOVE_FAILED), 'error', migrationId)
const exitWatch = {
  arm: (will: AgentWill | undefined) => data.exitWatch && binding.exitWatchArm?.(data.exitWatch, EXIT_MOVE_FAILED, FAILED_ANSWER_MS, notTaken('the migration agent ended before every page arrived'), will ? JSON.stringify(will) : undefined),
  disarm: () => data.exitWatch && binding.exitWatchDisarm?.(data.exitWatch),
  fire: () => data.exitWatch && binding.exitWatchFire?.(data.exitWatch, EXIT_MOVE_FAILED, FAILED_ANSWER_MS, notTaken('the migration failed after the hand-off')),
}

/**
 * The agent's role belongs to a migration, not to the process: a guest that
 * arrived here (the incoming side) can be the source of the next migration
 * once it settled, any number of times.
 */
const outgoing = outgoingMigrations()
const incoming = data.role === 'destination' ? incomingMigration(data.will) : undefined
if (!data.will) void warmLinkCode() // idle now; a migration's first connection then runs warm code

port.on('message', onMain) // (a standby that took over: the messages that waited for it come now)

// testing (as install:N in native/page_maps.h): such a bug once the service's thread waits in a fault, or at once
// (source: agent-crash:precopy as pre-copy begins, agent-crash:paused as the service's paused state arrives,
// agent-crash:postcopy once pages move after the hand-off, agent-crash:settled once SETTLED came, before the report;
// destination: agent-crash:precopy 100 ms into a session's pre-copy, agent-crash:restore as it asks the service's
// thread to restore the hand-off state, agent-crash:armed just before that (its will armed, the service never
// asked), agent-crash:postcopy 200 ms after the service resumed)
// (and 'agent-crash:paused+takeover': the agent that takes over throws too, as it starts)
// (and, no crash: 'demand-stall' on a source serves the first demand connection after the hand-off 3 s late)
const injected = process.env.UFFD_MIGRATE_FAULT_INJECT?.split('+')
const inject = data.takeover ? undefined : injected?.[0]
if (data.takeover && injected?.[1] === 'takeover') setImmediate(() => injectedCrash(`${injected.join('+')} (the new agent)`))
if (inject === 'agent-crash') crashOnceMainBlocked()
if (inject === 'agent-crash:now') setImmediate(() => injectedCrash('agent-crash:now'))

/** The service's main thread waits in a fault: its wchan. */
function crashOnceMainBlocked(): void {
  setInterval(() => readFileSync('/proc/self/wchan', 'utf8').includes('userfault') && injectedCrash('agent-crash'), 20).unref()
}

function injectedCrash(what: string): never {
  throw new Error(`injected by UFFD_MIGRATE_FAULT_INJECT=${what}`)
}

/**
 * Messages from the service's thread waiting behind a burst of pushed pages
 * (libuv reads a socket up to 32 times per turn: milliseconds of installs)
 * are taken between frames: ready() waits, willNeed() hints, serve() ports.
 */
function pollMain(): void {
  for (let r = receiveMessageOnPort(port as unknown as MessagePort); r; r = receiveMessageOnPort(port as unknown as MessagePort)) onMain(r.message as MainToAgent)
}

function onMain(m: MainToAgent): void {
  switch (m.type) {
    case 'migrate': {
      const settling = stillSettling()
      return settling ? post({ type: 'failed', error: settling }) : outgoing.start(m.options)
    }
    case 'takeOver':
      return outgoing.start(m.options, m.crash)
    case 'preflight': {
      const settling = stillSettling()
      return settling ? post({ type: 'preflightFailed', error: settling }) : outgoing.preflight(m.options)
    }
    case 'cancel':
      return outgoing.cancel()
    case 'setBandwidth':
      return outgoing.setBandwidth(m.limits)
    case 'paused':
      if (inject === 'agent-crash:paused') injectedCrash(inject)
      return outgoing.pause.answer(m)
    case 'pauseFailed':
      return outgoing.pause.refuse(m.error)
    case 'free':
      incoming?.dest.service.free(m.region, m.firstPage, m.pageCount, m.filled === true)
      return outgoing.freed(m.region, m.firstPage, m.pageCount)
    case 'resumed':
      // (an agent that took over before the restore's answer came hears it here)
      return incoming?.restore.waiting ? incoming.restore.answer(m.atMs) : incoming?.dest.resumed(m.atMs)
    case 'restoreFailed':
      return incoming?.restore.refuse(m.error)
    case 'rehearsed':
      return incoming?.rehearsed.answer()
    case 'willNeed':
      return incoming?.dest.service.willNeed(m.region, m.firstPage, m.pageCount)
    case 'wait':
      for (let k = 0; k + 4 <= m.waits.length; k += 4) incoming?.dest.service.waitFor(m.waits[k], m.waits[k + 1], m.waits[k + 2], m.waits[k + 3])
      return
    case 'serving':
      // only a route set up during this post-copy counts (a late serve() must not count for the next hop)
      if (incoming?.dest.service.announce(m.ports)) yielding.clientsRouted()
      return
  }
}

/** What the source takes, from the main thread's options and this agent's settings. */
function sourceOptions(wire: WireSourceOptions): SourceOptions {
  return { ...wire, token: Buffer.from(wire.token, 'utf8'), bulkBufferBytes, pushUnsentBytes, tracker: data.tracker, demandStallMs: inject === 'demand-stall' ? 3_000 : 0 }
}

function outgoingMigrations() {
  const pause = new MainThreadCall<PausedService>()
  let freed: number[] = []
  let source: MigrationSource | undefined
  return {
    pause,
    /** crash: a new agent takes the migration over (MigrationSource.takeOver()) instead of starting it. */
    start(wire: WireSourceOptions, crash?: TakeoverCause): void {
      if (source) {
        post({ type: 'failed', error: { code: ErrorCode.BUSY, message: 'a migration is already running for this guest' } })
        return
      }
      const opts = sourceOptions(wire)
      let phase = '', leftAtHandoff: number | undefined
      migrationId = wire.session
      if (crash) log('agent-takeover', sourceLine.takeover(wire.to, crash.phase), 'warn')
      else log('migration-began', sourceLine.began(wire.to, wire.mode, { precopyBytesPerSec: wire.maxBandwidth ?? 0, postcopyBytesPerSec: wire.maxPostcopyBandwidth ?? 0 }, wire.switchoverBandwidth, wire.session))
      const s = new MigrationSource(binding, regions, opts, {
        pause: () => pause.ask({ type: 'pause' }),
        resume: () => post({ type: 'resume' }),
        progress: (p) => {
          const line = p.phase !== phase ? sourceLine.phase(wire.to, phase, p.phase, wire.recoveryTimeoutMs, p.brokenBy) : undefined
          if (line) log(...line)
          phase = p.phase
          // once a page moved after the hand-off (the destination has HANDOFF then: it asks, or RESUMED started the push)
          if (inject === 'agent-crash:postcopy' && phase === 'postcopy' && p.pagesLeft < (leftAtHandoff ??= p.pagesLeft)) setImmediate(() => injectedCrash(inject))
          if (inject === 'agent-crash:precopy' && phase === 'precopy') setImmediate(() => injectedCrash(inject))
          post({ type: 'progress', progress: p })
        },
        forwardTo: (host, ports) => {
          post({ type: 'forwardTo', host, ports })
          yielding.clientsRouted()
        },
        postcopy: () => yielding.enterWhen(opts.forward === true, opts.postcopyNice),
        takeFreed: () => {
          const out = freed
          freed = []
          return out
        },
      })
      source = s
      yielding.begin()
      ;(crash ? s.takeOver(crash) : s.run()).then(
        (report) => {
          // (an uncaught rejection: the agent ends with its link closed after SETTLED, the report not yet told)
          if (inject === 'agent-crash:settled') injectedCrash(inject)
          stopYielding()
          log('moved', sourceLine.moved(wire.to, report))
          post({ type: 'report', report })
        },
        (err) => {
          stopYielding()
          source = undefined
          freed = []
          const e = errorOut(err)
          log(e.code === ErrorCode.CANCELLED ? 'migration-cancelled' : 'migration-failed', sourceLine.failed(wire.to, e), e.code === ErrorCode.CANCELLED ? 'info' : 'error')
          post({ type: 'failed', error: e })
        },
      )
    },
    /** A preflight: what a migration with these options would meet before its first page (it runs beside nothing else). */
    preflight(wire: WireSourceOptions): void {
      const line = logAbout(wire.session)
      preflight(binding, regions, { ...sourceOptions(wire), session: wire.session! }).then(
        (report) => (line('preflight', sourceLine.preflight(wire.to, report), 'info'), post({ type: 'preflightDone', report })),
        (err) => {
          const e = errorOut(err)
          line('preflight', sourceLine.preflightFailed(wire.to, e), 'warn')
          post({ type: 'preflightFailed', error: e })
        },
      )
    },
    cancel(): void {
      if (!source) {
        post({ type: 'cancelRefused', error: { code: ErrorCode.INVALID_ARG, message: 'no migration is running for this guest: nothing to cancel' } })
        return
      }
      const refused = source.cancel()
      if (refused) post({ type: 'cancelRefused', error: errorOut(refused) })
    },
    setBandwidth(limits: Partial<BandwidthLimits>): void {
      if (!source) post({ type: 'bandwidthRefused', error: { code: ErrorCode.INVALID_ARG, message: 'no migration is running for this guest' } })
      else {
        const now = source.setBandwidth(limits)
        log('bandwidth-changed', sourceLine.limits(source.to, now))
        post({ type: 'bandwidthSet', limits: now })
      }
    },
    freed(region: number, firstPage: number, pageCount: number): void {
      // Only a running migration needs them: between migrations the
      // present-page scan of round 0 sees freed pages as zero anyway.
      if (source) freed.push(region, firstPage, pageCount)
    },
  }
}

function incomingMigration(will?: AgentWill) {
  const received = data.received!.map((sab, i) => new PageBitmap(regions[i].pageCount, sab))
  const restore = new MainThreadCall<number>()
  const rehearsed = new MainThreadCall<void>()
  const dest: MigrationDestination = new MigrationDestination(binding, regions, received, {
    token: Buffer.from(data.token!, 'utf8'), bulkBufferBytes, encrypt: data.encrypt,
    // (UFFD_MIGRATE_MEMORY_CHECK=0: the operator knows better, e.g. memory the kernel will free that it cannot see)
    memoryHeadroom: process.env.UFFD_MIGRATE_MEMORY_CHECK === '0' ? undefined : () => memoryHeadroom(),
  }, {
    // from here the service's thread may run (and wait on a page only an agent can install) before this agent hears
    // of it: armed now with the will (a standby takes over; without one, a crash ends the process, never hangs it).
    // Also with no page left: the settlement with the source is still to come, and without an agent for it the
    // service would fail here while the source, handed off, gives up on it (found by `npm run soak`)
    restore: (state: Uint8Array): Promise<number> => {
      const w: AgentWill | undefined = dest.will()
      exitWatch.arm(w)
      if (inject === 'agent-crash:restore') setImmediate(() => injectedCrash(inject))
      if (inject === 'agent-crash:armed') return setImmediate(() => injectedCrash(inject)), new Promise<number>(() => {}) // (never asks)
      return restore.ask(...withOwnState({ type: 'restore' as const, state, standby: w !== undefined }))
    },
    pollService: pollMain,
    postcopy: (nice, forwarded) => yielding.enterWhen(forwarded, nice),
    incoming: (o) => {
      migrationId = o.session
      log('incoming', destinationLine({ kind: 'began', peer: o.peer, migration: o.session, encrypted: o.encrypted }, regions))
      post({ type: 'incoming', peer: o.peer, migration: o.session }) // for status while the guest waits
      if (inject === 'agent-crash:precopy') setTimeout(() => dest.phase === DestPhase.PRECOPY && injectedCrash(inject), 100)
      return o.servesHttp ? rehearsed.ask({ type: 'rehearse' }) : undefined
    },
    settled: () => {
      exitWatch.disarm()
      stopYielding()
      post({ type: 'settled' })
    },
    ready: (ids) => post({ type: 'ready', ids }),
    failed: (err) => {
      stopYielding()
      const e = errorOut(err)
      log(e.code === ErrorCode.HANDOFF ? 'handoff-refused' : 'migration-failed', destinationTrouble.failed(e), 'error')
      post({ type: 'failed', error: e })
      // a thread blocked in a fault on one of those pages, for ever, can neither handle this nor exit, and a process
      // that looks alive but answers nothing would hide the failure from its supervisor
      exitWatch.fire()
    },
    recovering: (message) => {
      log('link-broken', message, 'warn')
      post({ type: 'recovering', message })
    },
    refused: (message, refusals) => {
      logAbout(undefined)('refused', message, 'warn') // (another peer's connection: not the migration running)
      post({ type: 'refused', message, refusals: { ...refusals } })
    },
    milestone: (m) => {
      log(MILESTONE_EVENTS[m.kind], destinationLine(m, regions))
      if (m.kind === 'back') post({ type: 'linkBack' })
      if (m.kind !== 'resumed') return
      exitWatch.arm(dest.will()) // now with the resume time
      if (inject === 'agent-crash:postcopy') setTimeout(() => dest.phase !== DestPhase.SETTLED && injectedCrash(inject), 200)
    },
    preflight: (o) => logAbout(o.session)(MILESTONE_EVENTS.preflight, destinationLine({ kind: 'preflight', peer: o.peer, migration: o.session, residentBytes: o.residentBytes, room: o.room }, regions)),
    sessionEnded: (err, session) => {
      // (also a session that ended before it began, at its region table: the source logged the same id)
      migrationId ??= session.id
      if (session.preflight) log('preflight', destinationTrouble.preflightFailed(err as UffdMigrateError), 'warn')
      else log('session-ended', destinationTrouble.sessionEnded(err as UffdMigrateError), 'warn')
      migrationId = undefined
      post({ type: 'sessionEnded' })
    },
  })
  if (will) {
    migrationId = will.session
    log('agent-takeover', destinationTrouble.takeover(will, dest.pagesLeft), 'warn')
    dest.takeOver(will, data.listen!)
    exitWatch.arm(dest.will()) // the countdown the crash started stops
  } else {
    dest.listen(data.listen!).then(
      (p) => post({ type: 'listening', port: p, atMs: nowMs() }),
      (err) => post({ type: 'failed', error: errorOut(err) }),
    )
  }
  return {
    dest,
    restore,
    rehearsed,
    get phase() {
      return dest.phase
    },
  }
}
