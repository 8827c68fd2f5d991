/**
 * Time as the engines see it: injected so that the pure test tier can run
 * the bulk gate's rules and the recovery deadline on a fake clock.
 */
import { nowMs } from '../stats'

export type TimerHandle = unknown

export interface Clock {
  /** Monotonic milliseconds. */
  now(): number
  setTimeout(fn: () => void, ms: number): TimerHandle
  clearTimeout(handle: TimerHandle): void
  /** After the I/O of this turn of the loop. */
  setImmediate(fn: () => void): void
}

export const systemClock: Clock = {
  now: nowMs,
  setTimeout: (fn, ms) => setTimeout(fn, ms),
  clearTimeout: (h) => clearTimeout(h as NodeJS.Timeout),
  setImmediate: (fn) => void setImmediate(fn),
}

/** Resolves after ms on the given clock. */
export function sleep(clock: Clock, ms: number): Promise<void> {
  return new Promise((resolve) => clock.setTimeout(resolve, ms))
}

/** A timer this much past its time says that the process did not run meanwhile (stopped, or its loop blocked). */
export const LATE_MS = 500

/**
 * A deadline: `expired` runs once ms of this process's running time passed, unless cancelled first (the returned
 * function). A timer that comes due while the process cannot run (SIGSTOP, a frozen VM, a loop blocked) runs before
 * the I/O that arrived meanwhile is read, so a peer that answered in time looked late (seen: `npm run soak -- --stop
 * source:4000` failed a handshake whose answer sat unread). Such a late timer gives the time it lost back instead of
 * expiring.
 */
export function deadline(clock: Clock, ms: number, expired: () => void): () => void {
  let timer: TimerHandle | undefined
  const arm = (waitMs: number) => {
    const dueAtMs = clock.now() + waitMs
    timer = clock.setTimeout(() => {
      const lateMs = clock.now() - dueAtMs
      if (lateMs > LATE_MS) return arm(lateMs)
      timer = undefined
      expired()
    }, waitMs)
    ;(timer as { unref?: () => void }).unref?.() // a deadline alone does not keep a loop alive
  }
  arm(ms)
  return () => {
    if (timer !== undefined) clock.clearTimeout(timer)
    timer = undefined
  }
}
