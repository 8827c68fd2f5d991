/**
 * A destination's standby agent started with the receiver, while the service's thread waits for its source with
 * nothing else to do, and kept across the sessions that end before the hand-off. Started after the resume instead
 * (as before), it came too late for a service whose thread blocked in a fault first: that thread could not start it,
 * and an agent crash then ended the process (exit 4) although the source could still send every page. A Worker's
 * start costs the starting thread 0.15-6.6 ms here, too much for the pause window or the resume; started when a
 * session began, its loading slowed a 256 MiB hybrid migration on this 2-vCPU machine (485 against 418 ms, medians of 8);
 * started with the receiver, 418 against 406 ms (the noise).
 * It waits for the agent's will only from its go() on (the service resumes here, or the agent crashed after asking
 * for the restore): a crash before that is the service's thread's to handle (the hand-off did not happen here).
 */
import type { AgentWorkerData } from './agent/worker-data'
import { type StartedStandby, standbyWorker } from './agent-handle'

export class EarlyStandby {
  private current: StartedStandby | undefined

  /** data: the receiving agent's (undefined: no standby, e.g. UFFD_MIGRATE_STANDBY=0 or no exit watch). */
  constructor(private readonly data: AgentWorkerData | undefined) {}

  /** The receiver starts: one standby waits from now on, across the sessions that end before the hand-off. */
  start(): this {
    if (!this.data || this.current) return this
    const flag = new SharedArrayBuffer(4), word = new Int32Array(flag)
    const worker = standbyWorker(this.data, flag)
    const started: StartedStandby = { worker, go: () => (Atomics.store(word, 0, 1), Atomics.notify(word, 0)) }
    worker.on('error', () => {}) // it logged it (standby.ts); the guest's handle watches the one it adopts
    worker.once('exit', () => this.current === started && (this.current = undefined))
    worker.unref()
    this.current = started
    return this
  }

  /** The hand-off: the standby for the guest when one is wanted (pages to come, a will armed), else it ends. */
  take(wanted: boolean): StartedStandby | undefined {
    const started = this.current
    this.current = undefined
    if (started && !wanted) void started.worker.terminate()
    return wanted ? started : undefined
  }

  /** No service starts here (the receiver gave up): nothing to stand by for. */
  stop(): void {
    void this.take(false)
  }
}
