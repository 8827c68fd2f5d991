/**
 * The operator's bandwidth limits of one migration (QEMU's max-bandwidth and
 * max-postcopy-bandwidth): the pre-copy rounds, and the post-copy push, each
 * send at most so many bytes a second over all their bulk connections
 * together, so that a migration over a link the service's own clients use
 * leaves them room. Two transfers are never limited: the hand-off (the
 * service is paused: every millisecond is downtime, as QEMU's switchover) and
 * the pages a fault waits for (their own demand connection). The kernel paces
 * the sockets (SO_MAX_PACING_RATE): no timer or thread here, and a native
 * writer is paced as well as a JS one. A change (set-bandwidth) applies at
 * once, and to a link reopened after a break.
 */
import { SourcePhase } from './machine'

export interface BandwidthLimits {
  /** Pre-copy rounds: bytes a second over all bulk streams (0: no limit). */
  precopyBytesPerSec: number
  /** The post-copy push: bytes a second (0: no limit); page requests are never held by it. */
  postcopyBytesPerSec: number
}

export const NO_LIMITS: BandwidthLimits = { precopyBytesPerSec: 0, postcopyBytesPerSec: 0 }

/** The lowest limit taken: below it a paced socket would hold a frame longer than a link timeout allows (1 MiB/s). */
export const MIN_BANDWIDTH_BYTES_PER_SEC = 1 << 20

export class Bandwidth {
  private limits: BandwidthLimits
  private phase: SourcePhase = SourcePhase.CONNECT
  /** set() was called (a limit lifted to 0 still counts: the report says what held at the end). */
  private everSet = false

  constructor(limits: BandwidthLimits = NO_LIMITS) {
    this.limits = { ...limits }
  }

  get current(): BandwidthLimits {
    return { ...this.limits }
  }

  /** The source's phase changed; true when the rate of its bulk sockets changes with it. */
  enter(phase: SourcePhase): boolean {
    const before = this.bytesPerSec
    this.phase = phase
    return this.bytesPerSec !== before
  }

  /** New limits from the operator (the ones not given stay). */
  set(limits: Partial<BandwidthLimits>): void {
    this.limits = { ...this.limits, ...limits }
    this.everSet = true
  }

  /** A limit was given at some point (the report then says which held at the end). */
  get limited(): boolean {
    return this.everSet || this.limits.precopyBytesPerSec > 0 || this.limits.postcopyBytesPerSec > 0
  }

  /** What the bulk connections may send together now (0: no limit). */
  get bytesPerSec(): number {
    switch (this.phase) {
      case SourcePhase.CONNECT:
      case SourcePhase.PRECOPY:
        return this.limits.precopyBytesPerSec
      case SourcePhase.POSTCOPY:
      case SourcePhase.RECOVERING:
        return this.limits.postcopyBytesPerSec
      default:
        return 0 // the hand-off, and after the end
    }
  }
}

/** Each of `connections` bulk sockets' share of `bytesPerSec` (0: no limit). */
export function perConnection(bytesPerSec: number, connections: number): number {
  return bytesPerSec > 0 ? Math.max(1, Math.floor(bytesPerSec / Math.max(1, connections))) : 0
}
