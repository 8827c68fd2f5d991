/**
 * The service's side of a migration's pause (the agent asked for it): the forwarding rehearsal ends first (it runs
 * on this thread, before the pause window, while the service serves), then the service stops: the downtime counts
 * from here, its clients are held (not refused) until it runs again, its pause() runs, and its state goes to the agent
 * without a copy. A pause() that throws is told to the agent, which resumes the service.
 */
import { type MainToAgent, withOwnState } from './agent/messages'
import { ErrorCode } from './errors'
import { handoffState } from './receive'
import { nowMs } from './stats'

/** The running migration's marks: when the service stopped, and a promise that settles once pause() returned. */
export interface PausingRun {
  stoppedAtMs?: number
  pausing?: Promise<void>
}

export async function pauseService(run: PausingRun | undefined, s: { rehearsal: Promise<unknown> | undefined; holdClients: () => void; pause?: () => unknown; post: (m: MainToAgent, transfer?: ArrayBuffer[]) => void }): Promise<void> {
  let paused!: () => void
  if (run) run.pausing = new Promise((r) => (paused = r))
  try {
    await s.rehearsal
    const stoppedAtMs = nowMs()
    if (run) run.stoppedAtMs = stoppedAtMs
    s.holdClients()
    const state = s.pause ? await s.pause() : undefined
    s.post(...withOwnState({ type: 'paused' as const, state: handoffState.encode(state), stoppedAtMs, postedAtMs: nowMs() }))
  } catch (err) {
    s.post({ type: 'pauseFailed', error: { code: ErrorCode.PAUSE, message: `pause() failed: ${(err as Error).message}` } })
  }
  paused?.()
}
