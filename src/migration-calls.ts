/**
 * What the service's thread asks of the migration running from it (cancel,
 * set-bandwidth), and of one that would (preflight): each asked of the agent
 * with one message and answered by one, or by the migration's own end.
 * Callers that cancel again before an answer share it.
 */
import type { BandwidthLimits } from './agent/source/bandwidth'
import type { AgentToMain, MainToAgent, WireSourceOptions } from './agent/messages'
import type { PreflightReport } from './agent/source/preflight'
import { ErrorCode, UffdMigrateError } from './errors'

interface Pending<T> {
  resolve: (v: T) => void
  reject: (e: Error) => void
}

export class MigrationCalls {
  private cancelling: Pending<void> | undefined
  /** Oldest first: the agent answers set-bandwidth calls in order. */
  private readonly limiting: Pending<BandwidthLimits>[] = []
  /** Oldest first too: preflights are answered in order. */
  private readonly checking: Pending<PreflightReport>[] = []

  /** hold: true while a preflight waits for its answer (the agent's worker then keeps the process), false after. */
  constructor(private readonly post: (m: MainToAgent) => void, private readonly hold: (held: boolean) => void = () => {}) {}

  /** Takes the agent's answer to one of these calls (true), or leaves the message to the guest (false). */
  take(m: AgentToMain): boolean {
    const err = 'error' in m ? new UffdMigrateError(m.error.message, m.error.code) : undefined
    if (m.type === 'cancelRefused') this.cancelRefused(err!)
    else if (m.type === 'bandwidthSet') this.limiting.shift()?.resolve(m.limits)
    else if (m.type === 'bandwidthRefused') this.limiting.shift()?.reject(err!)
    else if (m.type === 'preflightDone' || m.type === 'preflightFailed') {
      const p = this.checking.shift()
      if (m.type === 'preflightDone') p?.resolve(m.report)
      else p?.reject(err!)
      if (p && !this.checking.length) this.hold(false)
    } else return false
    return true
  }

  /** See Guest.cancel(). running: a migration from here runs. */
  cancel(running: boolean): Promise<void> {
    if (!running) return Promise.reject(new UffdMigrateError('no migration is running for this guest: nothing to cancel', ErrorCode.INVALID_ARG))
    return new Promise((resolve, reject) => {
      const prev = this.cancelling
      this.cancelling = prev ? { resolve: () => (prev.resolve(), resolve()), reject: (e) => (prev.reject(e), reject(e)) } : { resolve, reject }
      if (!prev) this.post({ type: 'cancel' })
    })
  }

  /** See Guest.setBandwidth(). checked: the limits, or it throws why they are not (before anything else is said). */
  setBandwidth(running: boolean, checked: () => Partial<BandwidthLimits>): Promise<BandwidthLimits> {
    let limits: Partial<BandwidthLimits>
    try {
      limits = checked()
    } catch (err) {
      return Promise.reject(err)
    }
    if (!running) return Promise.reject(new UffdMigrateError('no migration is running for this guest: its limits are migrate() options (send --max-bandwidth)', ErrorCode.INVALID_ARG))
    return new Promise((resolve, reject) => {
      this.limiting.push({ resolve, reject })
      this.post({ type: 'setBandwidth', limits })
    })
  }

  /** See Guest.preflight(). wire: the options as the agent takes them, or it throws why no migration would start. */
  preflight(wire: () => WireSourceOptions): Promise<PreflightReport> {
    let options: WireSourceOptions
    try {
      options = wire()
    } catch (err) {
      return Promise.reject(err)
    }
    return new Promise((resolve, reject) => {
      if (!this.checking.length) this.hold(true)
      // a failure carries the id the destination logged it under (the CLI's dry-run JSON names it)
      this.checking.push({ resolve, reject: (err) => reject(Object.assign(err, { migration: options.session })) })
      this.post({ type: 'preflight', options })
    })
  }

  /** The agent crashed: a preflight it had not answered will not be (a migration's end is told on its own). */
  agentLost(err: Error): void {
    for (const p of this.checking.splice(0)) p.reject(err)
    this.hold(false)
  }

  private cancelRefused(err: Error): void {
    this.cancelling?.reject(err)
    this.cancelling = undefined
  }

  /** The migration ended: the service moved to `to`. */
  moved(to: string): void {
    this.end(new UffdMigrateError(`cannot cancel: the migration to ${to} is complete`, ErrorCode.CANCEL_REFUSED))
  }

  /** The migration ended with err (a cancel that was asked for, or a failure). */
  failed(err: Error): void {
    this.end(err, (err as UffdMigrateError).code === ErrorCode.CANCELLED)
  }

  private end(err: Error, cancelled = false): void {
    if (cancelled) this.cancelling?.resolve()
    else this.cancelling?.reject(err)
    this.cancelling = undefined
    const over = new UffdMigrateError('the migration ended: its bandwidth can no longer change', ErrorCode.INVALID_ARG)
    for (const p of this.limiting.splice(0)) p.reject(over)
  }
}
