/**
 * A destination's agent that crashes after the hand-off (a bug) leaves the service running on pages that only an
 * agent can install: its threads block in faults nobody reads, and the source, finding the link broken, waits to dial
 * in again. A standby agent, started beside it once the service runs here (or, after a crash between the agent's
 * restore request and the resume, started then: the watch keeps the will for it), takes over: the crashed agent's will
 * (written by the exit watch, native/exit_watch.cc, as its environment ends) names the session, the userfaultfd it
 * held open and the port it listened on; the received maps are shared memory. The new agent adopts the descriptor,
 * wakes the blocked threads (they fault again, into its reader), listens on the same port and waits for the source's
 * RECOVER as after a broken link. QEMU and CRIU lose the guest when their destination process dies in post-copy.
 */
import type { NativeUffd } from '../../binding'
import { ErrorCode, migrationError } from '../../errors'
import type { RecoveryWindow } from './recovery'
import type { StuckLimits } from './watchdog'

export interface AgentWill {
  session: string
  /** The source's address (the operator's log). */
  peer: string
  /** Where the crashed agent listened: the source dials this again. */
  port: number
  /** The descriptor holdRegistrations() kept, and what UFFDIO_API answered for it. */
  uffd: { fd: number; features: number; ioctls: number }
  limits: StuckLimits
  recoveryTimeoutMs: number
  resumedAtMs: number | undefined
  postcopyNice: number
  forwarded: boolean
}

/** What a session learnt as it went (REGIONS, listen, HANDOFF) that a successor needs beside the session and its uffd. */
export class SessionNotes {
  limits: StuckLimits | undefined
  port = 0
  heldFd: number | undefined
  postcopy = { nice: 0, forwarded: false }

  /** The will, once the service runs here and its source may come back (recovery on); else undefined. */
  will(session: string | undefined, peer: string, uffd: NativeUffd | undefined, recovery: RecoveryWindow): AgentWill | undefined {
    if (!uffd || this.heldFd === undefined || !session || !this.limits || recovery.timeoutMs <= 0) return undefined
    const { nice, forwarded } = this.postcopy
    return { session, peer, port: this.port, uffd: { fd: this.heldFd, features: uffd.features, ioctls: uffd.ioctls }, limits: this.limits, recoveryTimeoutMs: recovery.timeoutMs, resumedAtMs: recovery.resumedAtMs, postcopyNice: nice, forwarded }
  }
}

/** The will as the standby reads it (one JSON line from its socket); checked, as anything that crosses a boundary. */
export function parseWill(line: string): AgentWill {
  let w: AgentWill | undefined
  try {
    w = JSON.parse(line) as AgentWill
  } catch {
    // (refused below)
  }
  const count = (v: unknown) => typeof v === 'number' && Number.isInteger(v) && v >= 0
  const ok = typeof w === 'object' && w !== null && typeof w.session === 'string' && count(w.port) && typeof w.uffd === 'object' && count(w.uffd?.fd) && count(w.uffd?.features) && count(w.recoveryTimeoutMs) && typeof w.limits === 'object'
  if (!ok) throw migrationError(ErrorCode.PROTOCOL, `the crashed agent's will is not one: ${line.slice(0, 200)}`)
  return w!
}
