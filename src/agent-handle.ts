/**
 * The service's thread's hold on its migration agent (a worker thread), and the agent's replacement.
 *
 * An agent that crashes (a bug) while a migration has the service paused leaves a question nobody here can answer:
 * did HANDOFF reach the destination? If it did, the service runs there and needs this process's memory for every
 * page it lacks; if not, it must resume here. Resuming blindly could run it twice, and staying paused loses it. So a
 * new agent takes over: it dials the destination with the migration's session as after a broken link (RECOVER), and
 * the destination's answer decides (RECOVER_STATE: post-copy goes on from what arrived; NO_SESSION: HANDOFF never
 * arrived, the service resumes here). QEMU and CRIU lose the guest when their source process dies in post-copy.
 *
 * A destination's agent that crashes after the hand-off may leave the service's thread blocked in a fault, unable to
 * start anything: so a standby agent, started with the receiver (src/early-standby.ts; else once the service runs
 * there), takes over by itself (src/agent/destination/takeover.ts), and this thread, when it sees the crash, only
 * makes it the agent it talks to (and tells it when the service resumed). A crash before any standby started (from the
 * agent's restore request on, the exit watch holds the will) starts one then.
 */
import { join } from 'node:path'
import { Worker } from 'node:worker_threads'
import type { AgentToMain, MainToAgent } from './agent/messages'
import type { AgentWorkerData } from './agent/worker-data'

export const AGENT_WORKER = __filename.endsWith('.ts')
  ? join(__dirname, '..', 'dist', 'agent', 'worker.js')
  : join(__dirname, 'agent', 'worker.js')

/** New agents one migration may get after crashes (a crash that repeats in the new one is not a fluke). */
export const MAX_TAKEOVERS = 1
/** New agents a process may get after crashes while its service runs there (a bug that keeps coming back ends it). */
export const MAX_AGENT_RESTARTS = 3

/** A standby agent; one started before the Guest (src/early-standby.ts) waits for the will from go() on. */
export interface StartedStandby {
  worker: Worker
  go?(): void
}

/** A standby agent's worker, idle until the agent's end hands it the will (go: the flag it waits for first, if any). */
export function standbyWorker(data: AgentWorkerData, go?: SharedArrayBuffer): Worker {
  return new Worker(AGENT_WORKER, { workerData: { ...data, standby: true, takeover: true, ...(go ? { standbyGo: go } : {}) } satisfies AgentWorkerData })
}

/** A crash of a destination's agent after it asked for the restore, before the service's Guest (and this) listened to it (src/receive.ts). */
export const crashBeforeGuest = new WeakMap<Worker, Error>()

export class AgentHandle {
  private worker!: Worker
  /** The service's resume time as posted to the agent: an agent that takes over hears it again. */
  private resumed: MainToAgent | undefined
  private exited!: Promise<void>
  /** Destination: the agent that takes over if this one crashes (standBy()), and how many did. */
  private standby: StartedStandby | undefined
  private promoted = 0
  /** Settled, failed or closed (dismiss()): nothing to take over from now on, no standby starts. */
  private dismissed = false
  /** Agents started in place of crashed ones (replace()). */
  replacements = 0

  constructor(worker: Worker, private readonly onMessage: (m: AgentToMain) => void, private readonly onCrash: (err: Error) => void, standby?: StartedStandby) {
    this.listen(worker)
    this.use(worker)
    if (standby) this.adopt(standby)
    const early = crashBeforeGuest.get(worker)
    if (early) queueMicrotask(() => this.onCrash(early)) // (once the Guest holds this)
  }

  private use(worker: Worker): void {
    this.worker = worker
    this.exited = new Promise((resolve) => worker.once('exit', () => resolve()))
  }

  private listen(worker: Worker): void {
    // (a 'message' listener refs the worker: it keeps the process alive until unref() after a migration)
    worker.on('message', this.onMessage)
    worker.on('error', (err) => worker === this.worker && this.onCrash(err)) // a standby's own crash: it logged it, and is no standby
  }

  post(m: MainToAgent, transfer: ArrayBuffer[] = []): void {
    if (m.type === 'resumed') (this.resumed = m), this.standby?.go?.()
    this.worker.postMessage(m, transfer)
  }

  /** While a migration runs, the agent keeps the process alive. */
  ref(): void {
    this.worker.ref()
  }

  unref(): void {
    this.worker.unref()
  }

  terminate(): Promise<number> {
    this.dismiss()
    return this.worker.terminate()
  }

  /**
   * Destination, once the service runs on pages still to come (its agent asks): a standby agent, idle until the
   * agent's end hands it the agent's will (native/exit_watch.cc). Its messages come here from the start: this thread
   * may take them before it sees the crash.
   */
  standBy(data: AgentWorkerData): void {
    if (this.standby || this.dismissed || this.promoted >= MAX_TAKEOVERS) return
    this.adopt({ worker: standbyWorker(data) })
  }

  /** A standby is this handle's from now on (one started with the receiver waits for the will once the service resumes: post()). */
  private adopt(s: StartedStandby): void {
    this.listen(s.worker)
    s.worker.unref()
    s.worker.once('exit', () => this.standby === s && (this.standby = undefined))
    this.standby = s
  }

  /**
   * The destination's agent crashed: the standby took over (or is taking over); it is the agent from now on. late: one
   * not started yet (the agent crashed between its restore request and the resume) starts now: the exit watch keeps the
   * will for it. It hears the resume time (an agent that took over before the restore's answer came needs it).
   */
  promote(late?: AgentWorkerData): boolean {
    if (!this.standby && late) this.standBy(late)
    const s = this.standby
    if (!s) return false
    s.go?.() // (an early one waits for the will from now on: the watch keeps it until then)
    const w = s.worker
    this.standby = undefined
    this.promoted++
    this.use(w)
    w.ref()
    if (this.resumed) w.postMessage(this.resumed)
    return true
  }

  /** Settled or failed: nothing to take over. */
  dismiss(): void {
    this.dismissed = true
    void this.standby?.worker.terminate()
    this.standby = undefined
  }

  /**
   * A new agent in place of one that crashed (a source's takeover, or any agent while its service runs here: it starts
   * as a source agent, which any guest that runs here needs); resolves once the crashed one's worker is gone too (its sockets closed with it, so the
   * destination has seen the link break and waits for the source to come back). The new one loads meanwhile: the old
   * one's teardown (its tracker's end walks the page tables) and the new one's start overlap.
   */
  async replace(data: AgentWorkerData): Promise<void> {
    const crashed = this.exited
    this.replacements++
    const w = new Worker(AGENT_WORKER, { workerData: { ...data, takeover: true } satisfies AgentWorkerData })
    this.listen(w)
    this.use(w)
    await crashed
  }
}
