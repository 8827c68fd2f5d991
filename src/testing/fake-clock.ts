/** A clock the test moves by hand (Clock of src/agent/clock.ts). */
import type { Clock } from '../agent/clock'

export class FakeClock implements Clock {
  private t = 1000
  private timers: { at: number; fn: () => void; id: number }[] = []
  private immediates: (() => void)[] = []
  private nextId = 1

  now(): number {
    return this.t
  }

  setTimeout(fn: () => void, ms: number): number {
    const id = this.nextId++
    this.timers.push({ at: this.t + ms, fn, id })
    return id
  }

  clearTimeout(handle: unknown): void {
    this.timers = this.timers.filter((x) => x.id !== handle)
  }

  setImmediate(fn: () => void): void {
    this.immediates.push(fn)
  }

  /** Runs what setImmediate queued (one turn of the loop). */
  turn(): void {
    const q = this.immediates
    this.immediates = []
    for (const fn of q) fn()
  }

  /** Moves time on, firing due timers in order. */
  advance(ms: number): void {
    const end = this.t + ms
    for (;;) {
      this.timers.sort((a, b) => a.at - b.at)
      const next = this.timers[0]
      if (!next || next.at > end) break
      this.timers.shift()
      this.t = Math.max(this.t, next.at) // (after a jump(): late)
      next.fn()
    }
    this.t = end
  }

  /** Moves time on without firing anything: a loop that was busy (its due timers run late, at the next advance). */
  jump(ms: number): void {
    this.t += ms
  }

  get pendingTimers(): number {
    return this.timers.length
  }
}
