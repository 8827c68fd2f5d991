/**
 * One error class for everything uffd-migrate throws. The addon receives it at
 * init and raises syscall failures as instances of it, with `code` (an errno
 * name such as 'EPERM' or a stable library code such as 'ERR_MIGRATION_AUTH'),
 * `errno` and `syscall` when a syscall failed.
 */
export class UffdMigrateError extends Error {
  code: string
  errno?: number
  syscall?: string
  /** ERR_MIGRATION_BUSY from a destination whose slot frees by itself: try again after this long. */
  retryAfterMs?: number
  /** The peer's ERROR, raised here: never told back to it (Channel.sendError). */
  fromPeer?: boolean
  /** The destination's ERROR said that its service never started (sent before a hand-off took effect there). */
  serviceStarted?: boolean
  /** A failed preflight: the id it went by (the destination's log names it, if the check got that far). */
  migration?: string

  constructor(message: string, code: string = ErrorCode.GENERIC, options?: { cause?: unknown }) {
    super(message, options)
    this.name = 'UffdMigrateError'
    this.code = code
  }
}

/** Stable library error codes. */
export const ErrorCode = {
  /** Native addon could not be loaded. */
  ADDON: 'ERR_ADDON_LOAD',
  /** A required kernel feature is missing. */
  FEATURE: 'ERR_KERNEL_FEATURE',
  /** Malformed, oversize or out-of-order message from the peer. */
  PROTOCOL: 'ERR_MIGRATION_PROTOCOL',
  /** Peer speaks another protocol version. */
  VERSION: 'ERR_MIGRATION_VERSION',
  /** Peer failed (or we failed) the shared-token challenge. */
  AUTH: 'ERR_MIGRATION_AUTH',
  /** Region table of source and destination differ. */
  REGIONS: 'ERR_MIGRATION_REGIONS',
  /** Could not reach the peer. */
  CONNECT: 'ERR_MIGRATION_CONNECT',
  /** A peer did not do its part in time: a handshake past its deadline, a session that never sent its region table, a page request unanswered for requestTimeoutMs, a link with no progress for linkTimeoutMs. */
  TIMEOUT: 'ERR_MIGRATION_TIMEOUT',
  /** Connection lost or closed mid-migration. */
  CONNECTION: 'ERR_MIGRATION_CONNECTION',
  /** Migration aborted (by the user or after a failure). */
  ABORTED: 'ERR_MIGRATION_ABORTED',
  /** The destination cannot hold the guest: its resident size and a margin exceed the memory the destination can still allocate (MemAvailable, memory cgroup limits). */
  MEMORY: 'ERR_MIGRATION_MEMORY',
  /** A migration is already running. */
  BUSY: 'ERR_MIGRATION_BUSY',
  /** The migration was cancelled before the hand-off (guest.cancel(), `uffd-migrate cancel`, Ctrl-C of `send`); the service runs on at the source. */
  CANCELLED: 'ERR_MIGRATION_CANCELLED',
  /** A returning source asked to recover a session the destination does not have: the hand-off never arrived there (or the receiver restarted), so the service does not run there. */
  NO_SESSION: 'ERR_MIGRATION_NO_SESSION',
  /** cancel() after the hand-off: the service already runs on the destination. */
  CANCEL_REFUSED: 'ERR_MIGRATION_CANCEL_REFUSED',
  /** Bad argument from a JS caller or the CLI. */
  INVALID_ARG: 'ERR_INVALID_ARG',
  /** The guest's pause() hook threw or returned unserialisable state. */
  PAUSE: 'ERR_GUEST_PAUSE',
  /** Region was released. */
  RELEASED: 'ERR_REGION_RELEASED',
  /** No guest with that name is running. */
  NO_GUEST: 'ERR_NO_GUEST',
  /** The migration agent (the worker thread) crashed or broke one of its own rules: a bug, never the service's. */
  AGENT: 'ERR_AGENT',
  /** The destination could not restore the hand-off state; the service did not start there and runs on at the source. */
  HANDOFF: 'ERR_MIGRATION_HANDOFF',
  /** A userfaultfd was used after close() (native). */
  UFFD_CLOSED: 'ERR_UFFD_CLOSED',
  /** Catch-all of the error class. */
  GENERIC: 'ERR_UFFD_MIGRATE',
} as const
/**
 * Exit code of a guest's process, on either side, whose migration failed after the hand-off: the service does not
 * run on the source any more, and cannot go on at the destination without the pages that did not arrive.
 */
export const EXIT_MOVE_FAILED = 4

export type ErrorCodeValue = (typeof ErrorCode)[keyof typeof ErrorCode]

export function migrationError(code: ErrorCodeValue, message: string, cause?: unknown): UffdMigrateError {
  return new UffdMigrateError(message, code, cause === undefined ? undefined : { cause })
}

/**
 * What a socket error on a migration connection means, for the operator at 3 a.m. (the errno alone says little):
 * ' (...)' to append to the message, or '' for an errno without a known meaning.
 */
export function linkErrnoMeaning(code: string | undefined): string {
  const meaning = code ? LINK_ERRNO_MEANING[code] : undefined
  return meaning ? ` (${meaning})` : ''
}
const LINK_ERRNO_MEANING: Record<string, string> = {
  ETIMEDOUT: "the peer's host acknowledged nothing for the link timeout (linkTimeoutMs): the link or that host is down",
  ECONNRESET: "reset by the peer's host, or by a firewall, NAT, load balancer or router on the way",
  EPIPE: 'the peer closed the connection while data was still going out',
  EHOSTUNREACH: "no route to the peer's host any more (its address or a route went away)",
  ENETUNREACH: "no route to the peer's network any more",
}
