/**
 * What the service's thread asks of the migration running from it (cancel,
 * set-bandwidth): each asked of the agent with one message and answered by
 * one, or by the migration's own end. Callers that ask again before an
 * answer share it.
 */
import type { BandwidthLimits } from './agent/source/bandwidth'
import type { MainToAgent } from './agent/messages'
import { ErrorCode, UffdMigrateError } from './errors'

interface Pending<T> {
  resolve: (v: T) => void
  reject: (e: Error) => void
}

export class MigrationCalls {
  private cancelling: Pending<void> | undefined
  /** Oldest first: the agent answers set-bandwidth calls in order. */
  private readonly limiting: Pending<BandwidthLimits>[] = []

  constructor(private readonly post: (m: MainToAgent) => void) {}

  /** See Guest.cancel(). running: a migration from here runs. */
  cancel(running: boolean): Promise<void> {
    if (!running) return Promise.reject(new UffdMigrateError('no migration is running for this guest: nothing to cancel', ErrorCode.INVALID_ARG))
    return new Promise((resolve, reject) => {
      const prev = this.cancelling
      this.cancelling = prev ? { resolve: () => (prev.resolve(), resolve()), reject: (e) => (prev.reject(e), reject(e)) } : { resolve, reject }
      if (!prev) this.post({ type: 'cancel' })
    })
  }

  /** See Guest.setBandwidth(). limits: checked already. */
  setBandwidth(running: boolean, limits: Partial<BandwidthLimits>): Promise<BandwidthLimits> {
    if (!running) return Promise.reject(new UffdMigrateError('no migration is running for this guest: its limits are migrate() options (send --max-bandwidth)', ErrorCode.INVALID_ARG))
    return new Promise((resolve, reject) => {
      this.limiting.push({ resolve, reject })
      this.post({ type: 'setBandwidth', limits })
    })
  }

  cancelRefused(err: Error): void {
    this.cancelling?.reject(err)
    this.cancelling = undefined
  }

  bandwidthSet(limits: BandwidthLimits): void {
    this.limiting.shift()?.resolve(limits)
  }

  bandwidthRefused(err: Error): void {
    this.limiting.shift()?.reject(err)
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
