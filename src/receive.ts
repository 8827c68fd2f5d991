/**
 * The hand-off state's codec, and receive mode in the service's main thread
 * up to the hand-off (receiveGuest(), which Guest.start() awaits): waits for
 * the incoming migration's hand-off and decodes the state pause() returned on
 * the source. Sessions that end before the hand-off (the agent logs each on stderr)
 * leave the guest waiting (only the hand-off commits).
 */
import { Worker } from 'node:worker_threads'
import { Packr } from 'msgpackr'
import type { AgentToMain, MainToAgent } from './agent/messages'
import { parseAddress } from './agent/address'
import type { AgentWill } from './agent/destination/takeover'
import type { AgentWorkerData } from './agent/worker-data'
import { AGENT_WORKER, crashBeforeGuest, type StartedStandby } from './agent-handle'
import type { NativeBinding } from './binding'
import { PageBitmap } from './bitmap'
import { type ControlledGuest, ControlServer, withoutControl } from './control'
import { EarlyStandby } from './early-standby'
import { ErrorCode, UffdMigrateError } from './errors'
import { rehearseForwarding } from './forward-rehearsal'
import { logLine } from './log'
import { type GuestOptions, resolveToken } from './options'
import type { Region } from './region'

const packr = new Packr({ useRecords: false })

/** The hand-off state as it crosses: what pause() returned on the source, msgpackr-encoded (empty: undefined). */
export const handoffState = {
  encode: (state: unknown): Uint8Array => (state === undefined ? new Uint8Array(0) : packr.pack(state)),
  decode: (bytes: Uint8Array): unknown => (bytes.length ? packr.unpack(bytes) : undefined),
}
// One round trip as the module loads: the codec's first use costs ~1 ms (compiling its paths), which belongs
// outside the pause window (measured: pause() returned → state posted went from ~1.1 to 0.15-0.37 ms).
handoffState.decode(handoffState.encode({ warm: [1, 1.5, 'x', true, null], bytes: new Uint8Array(8) }))

/** What a receiver's agent says of its sessions: refused connections by code (also after the hand-off), and the session before it. */
export interface Receiving {
  readonly refusals: Record<string, number>
  /** `listening`, or `precopy` while a source's session runs, from `from`. */
  phase: string
  from: string | undefined
  /** The id of the session running (status; the hand-off's once it arrived). */
  migration?: string
}

/** Follows the agent's messages about its sessions (it logs each one); r: what the agents before it counted. */
export function followReceiving(worker: Worker, r: Receiving = { refusals: {}, phase: 'listening', from: undefined }): Receiving {
  Object.assign(r, { phase: 'listening', from: undefined })
  worker.on('message', (m: AgentToMain) => {
    if (m.type === 'refused') Object.assign(r.refusals, m.refusals)
    if (m.type === 'incoming') Object.assign(r, { phase: 'precopy', from: m.peer, migration: m.migration })
    if (m.type === 'sessionEnded') Object.assign(r, { phase: 'listening', from: undefined, migration: undefined })
  })
  return r
}

/** guest.settled of a destination: resolved at settled, rejected at a failure (observed: a failure may come first). */
export function settlement(): { settled: Promise<void>; settle: () => void; settleFail: (e: Error) => void } {
  let settle!: () => void
  let settleFail!: (e: Error) => void
  const settled = new Promise<void>((res, rej) => ((settle = res), (settleFail = rej)))
  settled.catch(() => {})
  return { settled, settle, settleFail }
}

/** What `status` says of a guest that waits for its incoming migration (no service runs yet). */
export function waitingGuest(name: string, regions: { name: string; sizeBytes: number }[], session: Receiving): ControlledGuest {
  return {
    name,
    get phase() {
      return session.phase
    },
    get from() {
      return session.from
    },
    get migration() {
      return session.migration
    },
    restored: false,
    progress: undefined,
    lastError: undefined,
    refusals: session.refusals,
    regions: Object.fromEntries(regions.map((r) => [r.name, { name: r.name, sizeBytes: r.sizeBytes }])),
    migrate: () => Promise.reject(new UffdMigrateError(`guest '${name}' waits for its incoming migration: nothing runs here to send yet`, ErrorCode.BUSY)),
    preflight: () => Promise.reject(new UffdMigrateError(`guest '${name}' waits for its incoming migration: nothing runs here to send yet`, ErrorCode.BUSY)),
    cancel: () => Promise.reject(new UffdMigrateError(`guest '${name}' waits for its incoming migration: no migration from here to cancel`, ErrorCode.INVALID_ARG)),
    // the limits of an incoming migration are its source's: set-bandwidth there
    setBandwidth: () => Promise.reject(new UffdMigrateError(`guest '${name}' waits for its incoming migration: its bandwidth is set at the source (set-bandwidth there)`, ErrorCode.INVALID_ARG)),
    on: () => undefined,
    off: () => undefined,
  }
}

/** Agents a receiver starts before its hand-off: the first, and a new one after each crash (receiveHandoff()). */
export const MAX_RECEIVER_AGENTS = 4

/**
 * Waits for the incoming migration's hand-off. An agent that crashes before it (a bug, perhaps one that a peer's
 * bytes trigger) loses nothing: the service runs on at its source, and only the hand-off commits. So once its worker
 * is gone (its uffd closed, its threads joined: nothing writes the regions any more) the regions are emptied and a
 * new agent listens again, up to MAX_RECEIVER_AGENTS in all: a receiver stays up for the next source. An agent that
 * crashed before it listened (a bug at start) is not tried again.
 */
export async function receiveHandoff(spawn: (again: boolean) => Worker, empty: () => void, receiving: Receiving, name: string, listen: string): Promise<Handoff & { worker: Worker }> {
  for (let n = 1; ; n++) {
    const worker = spawn(n > 1)
    followReceiving(worker, receiving)
    try {
      return { ...(await awaitHandoff(worker, name, listen)), worker }
    } catch (err) {
      if ((err as UffdMigrateError).code !== ErrorCode.AGENT || !(err as { listened?: boolean }).listened || n >= MAX_RECEIVER_AGENTS) throw err
      if (worker.threadId !== -1) await new Promise((r) => worker.once('exit', r))
      empty()
      logLine(name, 'agent-crashed', `${(err as Error).message}; the regions are emptied and a new agent listens on ${listen} again (${n + 1} of ${MAX_RECEIVER_AGENTS})`, 'warn')
    }
  }
}

/** A destination's guest as its hand-off arrived: what Guest's constructor takes, and its settlement. */
export interface ReceivedGuest extends Handoff {
  worker: Worker
  workerData: AgentWorkerData
  received: PageBitmap[]
  settled: Promise<void>
  settle: () => void
  settleFail: (e: Error) => void
  early: StartedStandby | undefined
  refusals: Record<string, number>
  /** The id of the migration whose hand-off arrived. */
  migration: string | undefined
}

/**
 * Receive mode up to the hand-off: the regions' received maps (shared with the agent), a control socket that answers
 * status meanwhile, the early standby, and the receiver agents (receiveHandoff()). A failure before the hand-off
 * leaves nothing running: no service started, so nothing blocks in a fault.
 */
export async function receiveGuest(opts: GuestOptions, binding: NativeBinding, regions: Region[], listen: string, sourceAgent: AgentWorkerData): Promise<ReceivedGuest> {
  parseAddress(listen, '0.0.0.0')
  const token = resolveToken(opts.token)
  const received = regions.map((r) => PageBitmap.shared(r.pageCount))
  const workerData: AgentWorkerData = {
    ...sourceAgent,
    role: 'destination',
    received: received.map((b) => b.buffer as SharedArrayBuffer),
    listen,
    token,
    exitWatch: binding.exitWatchCreate?.(),
  }
  const receiving: Receiving = { refusals: {}, phase: 'listening', from: undefined }
  // status answers while the guest waits: phase 'listening', refused connections
  const waiting = opts.control !== false ? await ControlServer.start(waitingGuest(opts.name, regions, receiving)).catch(withoutControl(opts.name)) : undefined
  const early = new EarlyStandby(process.env.UFFD_MIGRATE_STANDBY === '0' || workerData.exitWatch === undefined ? undefined : workerData).start()
  const spawn = (again: boolean) => new Worker(AGENT_WORKER, { workerData: again ? { ...workerData, takeover: true } : workerData })
  // (the watch: armed once a crashed agent asked for the restore; its will's userfaultfd would keep the regions
  // registered, and the next agent's UFFDIO_REGISTER would fail with EBUSY: found by `npm run soak -- --inject`)
  const empty = () => (releaseWill(binding, binding.exitWatchDisarm?.(workerData.exitWatch!), opts.name), regions.forEach((r, i) => (r.discard(0, r.sizeBytes), received[i].words.fill(0))))
  const { state, worker, standby } = await receiveHandoff(spawn, empty, receiving, opts.name, listen)
    .catch((err) => (binding.exitWatchTake?.(workerData.exitWatch!), early.stop(), Promise.reject(err))) // no service started: nothing blocks
    .finally(() => waiting?.close())
  return { state, standby, worker, workerData, received, ...settlement(), early: early.take(standby), refusals: receiving.refusals, migration: receiving.migration }
}

/** A crashed receiver agent's will that nobody takes over: the userfaultfd it held is closed (its registrations end). */
function releaseWill(binding: NativeBinding, will: string | undefined, name: string): void {
  if (!will) return
  const { uffd } = JSON.parse(will) as AgentWill
  try {
    new binding.Uffd(uffd.features, uffd.fd, uffd.ioctls).close()
  } catch (err) {
    // (not open any more: nothing holds the regions; if something still did, the next session's register says so)
    logLine(name, 'agent-crashed', `the crashed agent's userfaultfd could not be closed: ${(err as Error).message}`, 'warn')
  }
}

/** The hand-off's state; standby: start a standby agent once the service runs (the agent's will is armed). */
export interface Handoff {
  state: unknown
  standby: boolean
}

export function awaitHandoff(worker: Worker, name: string, listen: string): Promise<Handoff> {
  return new Promise((resolve, reject) => {
    let listened = false
    const onMessage = (m: AgentToMain) => {
      if (m.type === 'listening') {
        listened = true
        // one line for the operator (and for tests that wait for it)
        logLine(name, 'listening', `waiting for the incoming migration on ${listen} (port ${m.port})`)
      }
      // the service restored here serves HTTP: its first requests must not run Node's HTTP code cold
      if (m.type === 'rehearse') void rehearseForwarding(1000).then(() => worker.postMessage({ type: 'rehearsed' } satisfies MainToAgent))
      if (m.type === 'restore') {
        let state: unknown
        try {
          state = handoffState.decode(m.state)
        } catch (err) {
          // The service does not start here: the agent tells the source
          // (ERROR ERR_MIGRATION_HANDOFF, its service resumes there) and
          // reports 'failed', which ends this wait below.
          worker.postMessage({ type: 'restoreFailed', error: { code: ErrorCode.HANDOFF, message: `could not decode the hand-off state: ${(err as Error).message}` } } satisfies MainToAgent)
          return
        }
        worker.off('message', onMessage)
        resolve({ state, standby: m.standby })
      }
      if (m.type === 'failed') {
        worker.off('message', onMessage)
        void worker.terminate()
        reject(new UffdMigrateError(m.error.message, m.error.code))
      }
    }
    worker.on('message', onMessage)
    // a bug in the agent before the hand-off: the service never started here (it runs on at the source)
    // (listened: whether it got that far; receiveHandoff() starts a new agent only for one that did)
    const onError = (err: Error) => {
      crashBeforeGuest.set(worker, err) // (after the restore request: a standby may take over, see AgentHandle)
      reject(Object.assign(new UffdMigrateError(`migration agent crashed before the hand-off: ${err.message}; the service runs on at the source`, ErrorCode.AGENT), { listened }))
    }
    worker.once('error', onError)
  })
}
