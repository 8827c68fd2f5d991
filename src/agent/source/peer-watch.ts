/**
 * Stuck-destination detection on the source, the twin of the destination's watchdog. The socket's liveness
 * (TCP_USER_TIMEOUT, keepalive) only catches a dead link: a destination that is connected but stopped (SIGSTOP, a
 * wedged loop) has its kernel answer for it, and the source waited for ever (for SETTLED, for a reply, for a fault
 * that never comes) without a line in its log. From REGIONS on, a destination sends KEEPALIVE every linkTimeoutMs / 4
 * while its session runs, so nothing read for linkTimeoutMs is a stuck destination: the link counts as broken (before
 * the hand-off the service runs on here; after it, post-copy dials back).
 */
import { ErrorCode, migrationError, type UffdMigrateError } from '../../errors'
import type { Clock } from '../clock'
import { ticks } from '../../deadline'

export class PeerWatch {
  private stopTicks: (() => void) | undefined

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
    if (this.linkTimeoutMs <= 0 || this.stopTicks) return
    let bytes = this.bytesRead(), sinceMs = this.clock.now()
    this.stopTicks = ticks(this.clock, Math.max(50, Math.min(1000, this.linkTimeoutMs / 5)), (late) => {
      const now = this.clock.now()
      // late: bytes may wait in the kernel, unread, so the quiet counts from now
      if (late || this.bytesRead() !== bytes) {
        bytes = this.bytesRead()
        sinceMs = now
      } else if (now - sinceMs >= this.linkTimeoutMs) {
        this.stop()
        this.stuck(migrationError(ErrorCode.CONNECTION,
          `the destination looks stuck: nothing arrived from it for ${Math.round(now - sinceMs)} ms (linkTimeoutMs ${this.linkTimeoutMs}; ` +
          'a live destination sends KEEPALIVE): a stopped or wedged receiver; treated as a broken link'))
      }
    })
  }

  /** Settled (a settled destination is quiet), failed, or the link closed. */
  stop(): void {
    this.stopTicks?.()
    this.stopTicks = undefined
  }
}
