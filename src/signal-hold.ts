/**
 * From the hand-off until the destination settles, the source's process holds the only copy of the pages the
 * destination still lacks: a SIGTERM then (a supervisor's stop, a deploy script), a SIGINT (Ctrl-C in the terminal it
 * was started from) or a SIGHUP (that terminal closed) would end it and lose the service there, where it already
 * runs (QEMU's and CRIU's sources die the same way in post-copy). Held: the signal is logged and deferred until the
 * migration ends; then it is raised again, and the process ends as it asked (by the signal, for its supervisor; a
 * migration that failed before its hand-off resumed the service here first), or, moved, by the exit it has then
 * anyway (0, once the clients it relays went idle: held until then). Armed from the service's pause, so that
 * no signal slips in between HANDOFF leaving and this thread hearing of it. A second one ends it at once, as asked
 * twice. SIGKILL cannot be held; nor can an exit the service's own listener of that signal makes (it should wait
 * while `guest.phase` is `handoff`, `postcopy` or `recovering`).
 */
import { logLine } from './log'

export const HELD_SIGNALS = ['SIGTERM', 'SIGINT', 'SIGHUP'] as const
type Held = (typeof HELD_SIGNALS)[number]

/** The process as the hold uses it (tests give a stand-in). */
export interface SignalTarget {
  on(sig: Held, listener: () => void): unknown
  off(sig: Held, listener: () => void): unknown
  kill(pid: number, sig: Held): unknown
  readonly pid: number
}

/** What the log line says: the guest, the migration, where to, its phase, and the pages still only here. */
export interface HoldContext {
  guest: string
  migration: string | undefined
  to: string
  phase: string
  pagesLeft: number
}

/**
 * A signal this soon after the one held is the same request, not a second one: Ctrl-C reaches a `receive` wrapper and
 * its service alike (one process group), and the wrapper passes its own on; so do npm, shells and init shims.
 */
export const SAME_REQUEST_MS = 500

export interface HoldOptions {
  target?: SignalTarget
  /** How long after the migration's end a held signal is raised (the caller's last words first). */
  finishAfterMs?: number
  /** UFFD_MIGRATE_HOLD_SIGNALS=0: never armed, signals keep their usual meaning (a supervisor whose stop must be immediate). */
  enabled?: boolean
  nowMs?: () => number
}

export class SignalHold {
  private listeners: Map<Held, () => void> | undefined
  private deferred: { sig: Held; atMs: number } | undefined
  private readonly target: SignalTarget
  private readonly nowMs: () => number

  /**
   * finish: what goes before a deferred signal is raised at the migration's end (the guest closes its control
   * socket: `send` must have read the report first, as in an exit after a move).
   */
  constructor(private readonly finish: () => Promise<void> = async () => {}, private readonly o: HoldOptions = {}) {
    this.target = o.target ?? process
    this.nowMs = o.nowMs ?? (() => performance.now())
  }

  get armed(): boolean {
    return this.listeners !== undefined
  }

  /** The signal held now, if one is (`status`). */
  get held(): Held | undefined {
    return this.deferred?.sig
  }

  /** The service paused for a migration's hand-off (context: read when a signal comes). */
  arm(context: () => HoldContext): void {
    if (this.armed || !(this.o.enabled ?? process.env.UFFD_MIGRATE_HOLD_SIGNALS !== '0')) return
    this.listeners = new Map(HELD_SIGNALS.map((sig) => [sig, () => this.signalled(sig, context())]))
    for (const [sig, l] of this.listeners) this.target.on(sig, l)
  }

  /**
   * The migration ended (settled, or failed): the listeners go, and a held signal is raised again once finished: the
   * process ends by it. Not called for a guest that moved and exits by itself once the clients it relays went idle:
   * the hold stays until that exit, which honours a signal held or still to come, so those clients see no error (a
   * second signal still ends it at once).
   */
  release(): void {
    const sig = this.stopListening()
    if (sig) setTimeout(() => void this.finish().catch(() => {}).then(() => this.target.kill(this.target.pid, sig)), this.o.finishAfterMs ?? 50)
  }

  /** The signal deferred, if one was. */
  private stopListening(): Held | undefined {
    for (const [sig, l] of this.listeners ?? []) this.target.off(sig, l)
    this.listeners = undefined
    const sig = this.deferred?.sig
    this.deferred = undefined
    return sig
  }

  private signalled(sig: Held, c: HoldContext): void {
    const now = this.nowMs()
    if (this.deferred && now - this.deferred.atMs < SAME_REQUEST_MS) return
    if (this.deferred) {
      const cost = c.phase === 'moved' ? 'the clients it relays see their connections reset' : `the service at ${c.to} fails when it needs one of the ${c.pagesLeft} page(s) it lacks`
      logLine(c.guest, 'signal-held', `${sig} again: ending now; ${cost}`, c.phase === 'moved' ? 'warn' : 'error', c.migration)
      this.stopListening()
      return void this.target.kill(this.target.pid, sig)
    }
    this.deferred = { sig, atMs: now }
    if (c.phase === 'moved') {
      return logLine(c.guest, 'signal-held', `${sig}: held: the service moved to ${c.to}, and this process exits once the clients it relays there went idle; at once on a second signal, ${SAME_REQUEST_MS} ms or more later (they see their connections reset)`, 'warn', c.migration)
    }
    const where = c.phase === 'postcopy' || c.phase === 'recovering'
      ? `the service runs there, and ${c.pagesLeft} page(s) it lacks are only in this process`
      : 'the service is paused for its hand-off, which may already be on its way'
    logLine(c.guest, 'signal-held', `${sig}: held until the migration to ${c.to} ends: ${where}; it ends then, or at once on a second signal, ${SAME_REQUEST_MS} ms or more later (the service there fails)`, 'warn', c.migration)
  }
}
