/**
 * The service's thread's hold on its migration agent (a worker thread), and the agent's replacement.
 *
 * An agent that crashes (a bug) while a migration has the service paused leaves a question nobody here can answer:
 * did HANDOFF reach the destination? If it did, the service runs there and needs this process's memory for every
 * page it lacks; if not, it must resume here. Resuming blindly could run it twice, and staying paused loses it. So a
 * new agent takes over: it dials the destination with the migration's session as after a broken link (RECOVER), and
 * the destination's answer decides (RECOVER_STATE: post-copy goes on from what arrived; NO_SESSION: HANDOFF never
 * arrived, the service resumes here). QEMU and CRIU lose the guest when their source process dies in post-copy.
 */
import { join } from 'node:path'
import { Worker } from 'node:worker_threads'
import type { AgentToMain, MainToAgent } from './agent/messages'
import type { AgentWorkerData } from './agent/worker'

export const AGENT_WORKER = __filename.endsWith('.ts')
  ? join(__dirname, '..', 'dist', 'agent', 'worker.js')
  : join(__dirname, 'agent', 'worker.js')

/** New agents one migration may get after crashes (a crash that repeats in the new one is not a fluke). */
export const MAX_TAKEOVERS = 1

export class AgentHandle {
  private worker!: Worker
  private exited!: Promise<void>

  constructor(worker: Worker, private readonly onMessage: (m: AgentToMain) => void, private readonly onCrash: (err: Error) => void) {
    this.attach(worker)
  }

  private attach(worker: Worker): void {
    this.worker = worker
    this.exited = new Promise((resolve) => worker.once('exit', () => resolve()))
    // (a 'message' listener refs the worker: it keeps the process alive until unref() after a migration)
    worker.on('message', this.onMessage)
    worker.on('error', this.onCrash)
  }

  post(m: MainToAgent, transfer: ArrayBuffer[] = []): void {
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
    return this.worker.terminate()
  }

  /**
   * A new source agent; resolves once the crashed one's worker is gone too (its sockets closed with it, so the
   * destination has seen the link break and waits for the source to come back). The new one loads meanwhile: the old
   * one's teardown (its tracker's end walks the page tables) and the new one's start overlap.
   */
  async replace(data: AgentWorkerData): Promise<void> {
    const crashed = this.exited
    this.attach(new Worker(AGENT_WORKER, { workerData: { ...data, takeover: true } satisfies AgentWorkerData }))
    await crashed
  }
}
