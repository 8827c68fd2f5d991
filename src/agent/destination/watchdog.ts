/**
 * Stuck-peer detection on the destination. The link timeout of the socket
 * (TCP_USER_TIMEOUT, keepalive) only catches a dead link; a source that is
 * connected but stopped (SIGSTOP, a wedged loop, a hostile peer) keeps the
 * link up and the guest's faulting threads waiting. Three rules, checked a
 * few times per timeout:
 * - a page request unanswered for requestTimeoutMs (post-copy);
 * - no byte on either connection for linkTimeoutMs while the session needs
 *   the source (pre-copy, or post-copy with pages missing); a live source
 *   sends KEEPALIVE, so a quiet link is a stuck peer;
 * - a connection left half-way through a frame for linkTimeoutMs.
 * Any of them is a broken link: post-copy enters recovery as for a reset,
 * pre-copy ends the session (the source's service runs on).
 * The same contract the other way: while the session runs, this side sends
 * KEEPALIVE every linkTimeoutMs / 4, so that the source can take a quiet
 * destination for a stuck one (src/agent/source/peer-watch.ts).
 */
import { stuckPeerError } from '../broken-link'
import type { Channel } from '../../protocol/channel'
import type { Clock } from '../clock'
import { ticks } from '../../deadline'
import { DestPhase } from './machine'

export interface WatchdogHost {
  phase(): DestPhase
  /** The session's connections now (none while recovering). */
  channels(): Channel[]
  /** Since when the oldest open page request has waited (undefined: none open). */
  oldestRequestSinceMs(): number | undefined
  /** Every page is local. */
  complete(): boolean
  broken(err: Error): void
  /** Sends KEEPALIVE to the source (on urgent, where it has room). */
  keepalive(): void
}

export interface StuckLimits {
  requestTimeoutMs: number
  linkTimeoutMs: number
}

export const DEFAULT_REQUEST_TIMEOUT_MS = 5000

/** Quiet this long, a pre-copy session's source may be gone (quietEndsInMs). */
const QUIET_MS = 500

export class Watchdog {
  private stopTicks: (() => void) | undefined
  private limits: StuckLimits = { requestTimeoutMs: 0, linkTimeoutMs: 0 }
  /** Per connection: bytes read at the last change and when that was. */
  private readonly seen = new Map<Channel, { bytes: number; atMs: number }>()
  private keptAliveAtMs = -Infinity

  constructor(
    private readonly clock: Clock,
    private readonly host: WatchdogHost,
  ) {}

  /** Arms the checks with the session's limits (0: that rule is off). */
  start(limits: StuckLimits): void {
    this.stop()
    this.limits = limits
    const on = [limits.requestTimeoutMs, limits.linkTimeoutMs].filter((t) => t > 0)
    if (!on.length) return
    // (at least 10 a second: quietEndsInMs() reads when a connection last moved to within a tick)
    const everyMs = Math.max(50, Math.min(100, Math.min(...on) / 5))
    this.stopTicks = ticks(this.clock, everyMs, (late) => {
      this.keepSourceInformed()
      // late: what the source sent meanwhile (answers, KEEPALIVE) is not read yet: no judging, the quiet counts from now
      if (late) return this.seen.clear()
      this.check()
    })
  }

  stop(): void {
    this.stopTicks?.()
    this.stopTicks = undefined
    this.seen.clear()
  }

  /** A new pair after recovery: progress is measured from now. */
  reset(): void {
    this.seen.clear()
  }

  /** KEEPALIVE every linkTimeoutMs / 4 while the session needs the link (pre-copy, post-copy). */
  private keepSourceInformed(): void {
    const { linkTimeoutMs } = this.limits, phase = this.host.phase(), now = this.clock.now()
    if (linkTimeoutMs <= 0 || (phase !== DestPhase.PRECOPY && phase !== DestPhase.POSTCOPY) || now - this.keptAliveAtMs < linkTimeoutMs / 4) return
    this.keptAliveAtMs = now
    this.host.keepalive()
  }

  check(): void {
    const phase = this.host.phase()
    if (phase !== DestPhase.PRECOPY && phase !== DestPhase.POSTCOPY) return
    const now = this.clock.now()
    const { requestTimeoutMs, linkTimeoutMs } = this.limits
    let lastProgressMs = -Infinity
    for (const ch of this.host.channels()) {
      const s = this.seen.get(ch)
      if (!s || s.bytes !== ch.bytesRead) this.seen.set(ch, { bytes: ch.bytesRead, atMs: now })
      const atMs = this.seen.get(ch)!.atMs
      lastProgressMs = Math.max(lastProgressMs, atMs)
      if (linkTimeoutMs > 0 && ch.midFrame && now - atMs > linkTimeoutMs) {
        return this.stuck(`the ${ch.name} connection stopped half-way through a frame ${Math.round(now - atMs)} ms ago`)
      }
    }
    if (phase === DestPhase.POSTCOPY && requestTimeoutMs > 0) {
      const since = this.host.oldestRequestSinceMs()
      if (since !== undefined && now - since > requestTimeoutMs) {
        return this.stuck(`a page request has been unanswered for ${Math.round(now - since)} ms (requestTimeoutMs ${requestTimeoutMs})`)
      }
    }
    const needsSource = phase === DestPhase.PRECOPY || !this.host.complete()
    if (linkTimeoutMs > 0 && needsSource && lastProgressMs > -Infinity && now - lastProgressMs > linkTimeoutMs) {
      this.stuck(`nothing arrived from the source for ${Math.round(now - lastProgressMs)} ms (linkTimeoutMs ${linkTimeoutMs})`)
    }
  }

  /**
   * A pre-copy session with no byte on any connection for half a second or more (a live source streams pages; a
   * source pausing its service sends KEEPALIVE every linkTimeoutMs / 4, and a new source told to wait only waits):
   * in how many ms the link rule drops it; undefined otherwise.
   */
  quietEndsInMs(): number | undefined {
    const { linkTimeoutMs } = this.limits, now = this.clock.now()
    if (linkTimeoutMs <= 0 || this.host.phase() !== DestPhase.PRECOPY) return undefined
    let lastMs = -Infinity
    for (const ch of this.host.channels()) {
      const s = this.seen.get(ch)
      lastMs = Math.max(lastMs, !s || s.bytes !== ch.bytesRead ? now : s.atMs)
    }
    const quietMs = now - lastMs
    return lastMs > -Infinity && quietMs >= QUIET_MS ? Math.max(0, linkTimeoutMs - quietMs) : undefined
  }

  private stuck(why: string): void {
    this.seen.clear()
    // CONNECTION: handled exactly as a reset (post-copy: recovery), but told when it ends the session
    this.host.broken(stuckPeerError(`the source looks stuck: ${why}; treated as a broken link`))
  }
}
