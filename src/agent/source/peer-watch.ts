/**
 * Stuck-destination detection on the source, the twin of the destination's watchdog. The socket's liveness
 * (TCP_USER_TIMEOUT, keepalive) only catches a dead link: a destination that is connected but stopped (SIGSTOP, a
 * wedged loop) has its kernel answer for it, and the source waited for ever (for SETTLED, for a reply, for a fault
 * that never comes) without a line in its log. From REGIONS on, a destination sends KEEPALIVE every linkTimeoutMs / 4
 * while its session runs, so nothing read for linkTimeoutMs is a stuck destination: the link counts as broken (before
 * the hand-off the service runs on here; after it, post-copy dials back).
 */
import { ErrorCode, migrationError, type UffdMigrateError } from '../../errors'
import type { Clock, TimerHandle } from '../clock'
import { LATE_MS } from '../../deadline'

export class PeerWatch {
  private timer: TimerHandle | undefined

  /**
   * bytesRead: everything read from the destination so far (any connection); stuck: called once, with a CONNECTION
   * error, when nothing came for linkTimeoutMs (0: never watched).
   */
  constructor(
    private readonly clock: Clock,
    private readonly linkTimeoutMs: number,
    private readonly bytesRead: () => number,
    private readonly stuck: (err: UffdMigrateError) => void,
  ) {}

  start(): void {
    if (this.linkTimeoutMs <= 0 || this.timer !== undefined) return
    const everyMs = Math.max(50, Math.min(1000, this.linkTimeoutMs / 5))
    let bytes = this.bytesRead(), sinceMs = this.clock.now(), tickedAtMs = sinceMs
    const tick = () => {
      const now = this.clock.now()
      // A late tick means this process did not run (stopped, its loop busy): bytes may wait in the kernel, unread, so
      // the quiet counts from now (the same rule as the destination's watchdog and deadline())
      if (this.bytesRead() !== bytes || now - tickedAtMs > everyMs + LATE_MS) {
        bytes = this.bytesRead()
        sinceMs = now
      } else if (now - sinceMs >= this.linkTimeoutMs) {
        this.timer = undefined
        return this.stuck(migrationError(ErrorCode.CONNECTION,
          `the destination looks stuck: nothing arrived from it for ${Math.round(now - sinceMs)} ms (linkTimeoutMs ${this.linkTimeoutMs}; ` +
          'a live destination sends KEEPALIVE): a stopped or wedged receiver; treated as a broken link'))
      }
      tickedAtMs = now
      this.arm(tick, everyMs)
    }
    this.arm(tick, everyMs)
  }

  /** Settled (a settled destination is quiet), failed, or the link closed. */
  stop(): void {
    if (this.timer !== undefined) this.clock.clearTimeout(this.timer)
    this.timer = undefined
  }

  private arm(tick: () => void, ms: number): void {
    this.timer = this.clock.setTimeout(tick, ms)
    ;(this.timer as { unref?: () => void }).unref?.() // the watch alone does not keep the agent's loop alive
  }
}
