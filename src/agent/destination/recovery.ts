/**
 * Post-copy recovery on the destination (as QEMU's postcopy-recover): the
 * service runs here and the source holds the pages it lacks, so a broken
 * link is not the end. Threads stay blocked in their faults (new faults are
 * recorded as in flight, not sent); the source has recoveryTimeoutMs to dial
 * in again with the same session and send RECOVER. This file keeps that
 * deadline and what the destination tells a returning source.
 */
import { ErrorCode, migrationError } from '../../errors'
import { brokenLinkCause, isProtocolBreak } from '../broken-link'
import type { Clock, TimerHandle } from '../clock'

export class RecoveryWindow {
  private timer: TimerHandle | undefined
  private brokenAtMs = 0
  /** From HANDOFF: how long a broken link may stay broken (0: no recovery). */
  timeoutMs = 0
  /** When the service resumed here (repeated in RECOVER_STATE: a RESUMED may be lost in a break). */
  resumedAtMs: number | undefined
  /** Outages of the link after the hand-off (a break while recovering is the same one): the settled line says so. */
  outages = 0
  /** Of the breaks, frames from the source that broke the protocol, each recovered (broken-link.ts's budget). */
  protocolBreaks = 0
  /** The SETTLED report, kept for a source that lost it in a break. */
  settledReport: Record<string, unknown> | undefined

  constructor(private readonly clock: Clock) {}

  get open(): boolean {
    return this.timer !== undefined
  }

  /** A break: counted, the operator's line, and the deadline once (a second break while recovering keeps the first deadline). */
  begin(err: Error, say: (line: string) => void, expired: (err: Error) => void): void {
    if (isProtocolBreak(err)) this.protocolBreaks++
    const why = brokenLinkCause(err, this.protocolBreaks)
    if (this.open) return say(`the connection broke again while recovering (${why}); the first break's deadline holds`)
    say(`the connection broke during post-copy (${why}); waiting up to ${this.timeoutMs} ms for the source to reconnect`)
    this.outages++
    this.brokenAtMs = this.clock.now()
    this.timer = this.clock.setTimeout(() => {
      this.timer = undefined
      expired(migrationError(ErrorCode.CONNECTION, `the connection broke during post-copy and the source did not reconnect within ${this.timeoutMs} ms: ${err.message}`))
    }, this.timeoutMs)
  }

  /** Ends the deadline (the source is back); returns how long the link was broken (ms). */
  stop(): number {
    if (this.timer !== undefined) this.clock.clearTimeout(this.timer)
    this.timer = undefined
    return this.clock.now() - this.brokenAtMs
  }

  /** RECOVER_STATE's body. */
  state(received: Buffer[]): Record<string, unknown> {
    if (this.settledReport) return { received: [], resumedAtMs: this.resumedAtMs, settled: this.settledReport }
    return { received, ...(this.resumedAtMs !== undefined ? { resumedAtMs: this.resumedAtMs } : {}) }
  }
}
