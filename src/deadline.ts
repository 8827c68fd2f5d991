/**
 * Deadlines and periodic checks that count only the time this process ran. A timer that comes due while the process cannot run
 * (SIGSTOP, a frozen VM, a loop blocked) runs before the I/O that arrived meanwhile is read, so a peer that answered
 * in time looked late (seen: `npm run soak -- --stop source:4000` failed a handshake whose answer sat unread).
 * Used by the engines (with their injected clock) and by the channel (real timers).
 */
import { nowMs } from './stats'

/** The part of a clock a deadline needs (src/agent/clock.ts's Clock is one). */
export interface TimerClock {
  now(): number
  setTimeout(fn: () => void, ms: number): unknown
  clearTimeout(handle: unknown): void
}

export const realTimers: TimerClock = {
  now: nowMs,
  setTimeout: (fn, ms) => setTimeout(fn, ms),
  clearTimeout: (h) => clearTimeout(h as NodeJS.Timeout),
}

/** A timer this much past its time says that the process did not run meanwhile (stopped, or its loop blocked). */
export const LATE_MS = 500

/**
 * `expired` runs once ms of this process's running time passed, unless cancelled first (the returned function): a
 * late timer gives the time it lost back instead of expiring. A deadline alone does not keep the loop alive.
 */
export function deadline(clock: TimerClock, ms: number, expired: () => void): () => void {
  let timer: unknown
  const arm = (waitMs: number) => {
    const dueAtMs = clock.now() + waitMs
    timer = clock.setTimeout(() => {
      const lateMs = clock.now() - dueAtMs
      if (lateMs > LATE_MS) return arm(lateMs)
      timer = undefined
      expired()
    }, waitMs)
    ;(timer as { unref?: () => void }).unref?.()
  }
  arm(ms)
  return () => {
    if (timer !== undefined) clock.clearTimeout(timer)
    timer = undefined
  }
}

/**
 * Calls tick every everyMs until the returned function stops it. late: this call came more than LATE_MS after its
 * time, so the process did not run meanwhile and what arrived then is not read yet: a check should not judge on it
 * (the destination's watchdog, the source's PeerWatch). tick may stop the ticks.
 */
export function ticks(clock: TimerClock, everyMs: number, tick: (late: boolean) => void): () => void {
  let timer: unknown
  const arm = () => {
    const dueAtMs = clock.now() + everyMs
    timer = clock.setTimeout(() => {
      const late = clock.now() - dueAtMs > LATE_MS
      arm()
      tick(late)
    }, everyMs)
    ;(timer as { unref?: () => void }).unref?.()
  }
  arm()
  return () => {
    if (timer !== undefined) clock.clearTimeout(timer)
    timer = undefined
  }
}
