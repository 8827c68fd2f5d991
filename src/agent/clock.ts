/**
 * Time as the engines see it: injected so that the pure test tier can run
 * the bulk gate's rules and the recovery deadline on a fake clock.
 */
import { realTimers } from '../deadline'

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
  ...realTimers,
  setImmediate: (fn) => void setImmediate(fn),
}

/** Resolves after ms on the given clock. */
export function sleep(clock: Clock, ms: number): Promise<void> {
  return new Promise((resolve) => clock.setTimeout(resolve, ms))
}
