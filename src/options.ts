/**
 * Options from JS callers, the environment and the CLI, checked and
 * resolved in one place: every bad value gets ERR_INVALID_ARG (or
 * ERR_MIGRATION_AUTH for tokens) with the name the caller used.
 */
import { readFileSync } from 'node:fs'
import { parseAddress } from './agent/address'
import type { WireSourceOptions } from './agent/messages'
import { resolvePostcopyNice } from './agent/yielding'
import { type BandwidthLimits, MIN_BANDWIDTH_BYTES_PER_SEC } from './agent/source/bandwidth'
import { validatePrepaging, type PrepagingOptions } from './agent/prepaging'
import type { MigrationMode } from './agent/report'
import type { TrackerSetting } from './agent/tracker-choice'
import { ErrorCode, UffdMigrateError } from './errors'
import { resolveIntegerSetting } from './integer-setting'
import { DEFAULT_BULK_SOCKET_BUFFER_BYTES, DEFAULT_PUSH_UNSENT_BYTES } from './protocol/messages'

export interface GuestOptions {
  /** Names the control socket ($XDG_RUNTIME_DIR/uffd-migrate/<name>.sock or /run/uffd-migrate/<name>.sock). */
  name: string
  /** Region name -> bytes (rounded up to whole pages). */
  regions: Record<string, number>
  /** Hand-off: stop mutating the regions and return the small JS state to carry (msgpackr). */
  pause?: () => unknown
  /** A migration failed after pause(): the service may run here again. */
  resume?: () => void
  /** Shared token for the migration; default: $UFFD_MIGRATE_TOKEN or the file $UFFD_MIGRATE_TOKEN_FILE. */
  token?: string
  /**
   * Encrypt migrations (AES-256-GCM over an X25519 exchange bound to the token): receiving, this guest insists on it
   * whatever the source asks; sending, the default of migrate()'s `encrypt`. Default $UFFD_MIGRATE_ENCRYPT (1 or 0), else false.
   */
  encrypt?: boolean
  /** Receive mode: listen here for the incoming migration; default: $UFFD_MIGRATE_RECEIVE. */
  receive?: string
  /** Listen on the control socket for `uffd-migrate send/status` (default true). */
  control?: boolean
  /** End the process once moved and no 'moved' listener is attached (default true). */
  exitOnMoved?: boolean
  /**
   * Nice value (0-19) of the migration agent's threads; default
   * $UFFD_MIGRATE_AGENT_NICE or 0. Above 0 the service's own threads win the
   * CPU when both want it: less event-loop lag during the migration, a longer
   * migration on a busy host.
   */
  agentNice?: number
  /**
   * After it moved, a guest that serves (guest.serve()) lives on as a
   * forwarder until the destination settled and no client used it for this
   * long (default 2000), then exits.
   */
  forwardIdleMs?: number
  /**
   * Dirty-page tracker of migrations from here: 'auto' (default: wp-async on
   * Linux 6.7+, else sync-wp), 'wp-async' or 'sync-wp' (the fallback for
   * Linux 5.7-6.6, forced for tests and comparison); default
   * $UFFD_MIGRATE_TRACKER or 'auto'.
   */
  tracker?: TrackerSetting
}

export const MIGRATION_MODES: readonly MigrationMode[] = ['precopy', 'postcopy', 'hybrid']

export interface MigrateOptions {
  /** Destination address, host:port. */
  to: string
  mode?: MigrationMode
  downtimeMs?: number
  maxRounds?: number
  connectTimeoutMs?: number
  /** Post-copy: how long a broken link may stay broken before the migration fails (default 60 000; 0: fail at once). */
  recoveryTimeoutMs?: number
  /** A connection whose peer stops answering (a silent link) fails after this long (default 10 000, at least 1000; 0: never). */
  linkTimeoutMs?: number
  /** Post-copy: the destination treats a page request unanswered this long as a stuck source and recovers (default 5000; 100..3600000). */
  requestTimeoutMs?: number
  prepaging?: Partial<PrepagingOptions>
  /** Record the post-copy push order in the report. */
  pushLog?: boolean
  /**
   * Parallel bulk connections for the pre-copy rounds, each written and read
   * by a thread of its own, pages split by 2 MiB chunk (1..8, default
   * DEFAULT_STREAMS; the destination may grant fewer). Post-copy uses one.
   */
  streams?: number
  /**
   * From the hand-off the agents' threads on both hosts run at this nice
   * value, so that the service's threads win the CPU (0..19; default
   * $UFFD_MIGRATE_POSTCOPY_NICE or 10; 0: they keep their own). The threads
   * that move pages (a fault waits on them) keep theirs.
   */
  postcopyNice?: number
  /**
   * Bytes a second the pre-copy rounds may send, over all streams together (QEMU's max-bandwidth; default 0: no
   * limit; else at least 1 MiB/s). The hand-off is never limited. guest.setBandwidth() changes it while it runs.
   */
  maxBandwidth?: number
  /** Bytes a second the post-copy push may send (default 0: no limit); the pages a fault waits for never wait for it. */
  maxPostcopyBandwidth?: number
  /**
   * Bytes a second the link gives the hand-off, for pre-copy's convergence check only (QEMU's
   * avail-switchover-bandwidth; default 0: the rate the rounds measured). With maxBandwidth the rounds measure the
   * limit, while the hand-off goes at full speed: without this, pre-copy converges against the limit and may run to
   * maxRounds. Limits nothing.
   */
  switchoverBandwidth?: number
  /**
   * Where this host's forwarder reaches the service at the destination, for the clients it relays there (guest.serve();
   * default: the host of `to`). Set it when the migration goes over another network than the service's, or through
   * a proxy: the ports still come from the destination (SERVICE).
   */
  serviceHost?: string
  /**
   * After the hand-off, what becomes of the service when the destination is lost: it failed, or stayed unreachable
   * past `recoveryTimeoutMs`. 'fail' (default): the migration fails and the source's process ends (exit code 4): the
   * service ran there and is gone. 'resume': the service resumes here, with its state as of the hand-off (what it did
   * at the destination since is lost), once the destination's own recovery window has surely ended there, and with
   * it that service (`linkTimeoutMs` later; at once when it said it failed). Needs `linkTimeoutMs` > 0.
   */
  onDestinationLost?: 'fail' | 'resume'
  token?: string
  /**
   * Seal every connection of the migration: page contents and state are secret and tamper-evident on the way
   * (default: the guest's `encrypt`). The destination may insist on it anyway. The pages then go through the agents'
   * loops, not the native threads: slower, see the README's "Encrypted migrations".
   */
  encrypt?: boolean
}

/** Bulk streams by default (measured: see the README's "Parallel streams"). */
export const DEFAULT_STREAMS = 1

export function validateMigrateOptions(o: MigrateOptions, guestToken: string | undefined, guestEncrypt?: boolean): WireSourceOptions {
  const bad = (what: string) => new UffdMigrateError(what, ErrorCode.INVALID_ARG)
  if (!o || typeof o.to !== 'string') throw bad(`expected options.to to be a host:port string, got ${JSON.stringify(o?.to)}`)
  parseAddress(o.to)
  const mode = o.mode ?? 'hybrid'
  if (!MIGRATION_MODES.includes(mode)) throw bad(`expected mode ${MIGRATION_MODES.join('|')}, got ${JSON.stringify(mode)}`)
  const downtimeMs = o.downtimeMs ?? 50
  if (!(downtimeMs > 0)) throw bad(`expected downtimeMs > 0, got ${downtimeMs}`)
  const maxRounds = o.maxRounds ?? 5
  if (!Number.isInteger(maxRounds) || maxRounds < 1 || maxRounds > 1000) throw bad(`expected maxRounds in 1..1000, got ${maxRounds}`)
  const linkTimeoutMs = o.linkTimeoutMs ?? 10_000
  if (!(linkTimeoutMs === 0 || (linkTimeoutMs >= 1000 && linkTimeoutMs <= 3_600_000))) throw bad(`expected linkTimeoutMs 0 or in 1000..3600000, got ${linkTimeoutMs}`)
  const requestTimeoutMs = o.requestTimeoutMs ?? 5000
  if (!(requestTimeoutMs >= 100 && requestTimeoutMs <= 3_600_000)) throw bad(`expected requestTimeoutMs in 100..3600000, got ${requestTimeoutMs}`)
  const streams = o.streams ?? DEFAULT_STREAMS
  if (!Number.isInteger(streams) || streams < 1 || streams > 8) throw bad(`expected streams in 1..8, got ${streams}`)
  const [maxBandwidth, maxPostcopyBandwidth] = [validateBandwidth(o.maxBandwidth, 'maxBandwidth'), validateBandwidth(o.maxPostcopyBandwidth, 'maxPostcopyBandwidth')]
  const switchoverBandwidth = validateBandwidth(o.switchoverBandwidth, 'switchoverBandwidth', 'the measured rate')
  if (o.serviceHost !== undefined && !(typeof o.serviceHost === 'string' && /^[A-Za-z0-9._:-]{1,253}$/.test(o.serviceHost) && !/^[^:]*:\d+$/.test(o.serviceHost))) {
    throw bad(`expected serviceHost to be a host name or an IP address (no port: the destination says its service's ports), got ${JSON.stringify(o.serviceHost)}`)
  }
  const recoveryTimeoutMs = o.recoveryTimeoutMs ?? 60_000
  if (!(recoveryTimeoutMs >= 0 && recoveryTimeoutMs <= 86_400_000)) throw bad(`expected recoveryTimeoutMs in 0..86400000, got ${recoveryTimeoutMs}`)
  const onDestinationLost = o.onDestinationLost ?? 'fail'
  if (onDestinationLost !== 'fail' && onDestinationLost !== 'resume') throw bad(`expected onDestinationLost 'fail' or 'resume', got ${JSON.stringify(o.onDestinationLost)}`)
  // (a destination that never notices a silent link never ends its service: resuming here too would run it twice)
  if (onDestinationLost === 'resume' && linkTimeoutMs === 0) throw bad("onDestinationLost 'resume' needs linkTimeoutMs > 0: with 0 a destination behind a silent link never gives up its service")
  return {
    to: o.to,
    mode,
    downtimeMs,
    maxRounds,
    connectTimeoutMs: o.connectTimeoutMs ?? 5000,
    recoveryTimeoutMs,
    linkTimeoutMs,
    requestTimeoutMs,
    prepaging: validatePrepaging(o.prepaging),
    pushLog: o.pushLog ?? false,
    streams,
    postcopyNice: resolvePostcopyNice(o.postcopyNice),
    ...(maxBandwidth ? { maxBandwidth } : {}),
    ...(maxPostcopyBandwidth ? { maxPostcopyBandwidth } : {}),
    ...(switchoverBandwidth ? { switchoverBandwidth } : {}),
    ...(o.serviceHost !== undefined ? { serviceHost: o.serviceHost } : {}),
    ...(onDestinationLost === 'resume' ? { onDestinationLost } : {}),
    token: resolveToken(o.token ?? guestToken),
    encrypt: resolveEncrypt(o.encrypt ?? guestEncrypt, 'options.encrypt'),
  }
}

/** Guest.start()'s name and regions, checked: [name, bytes] of each region. */
export function guestRegions(opts: GuestOptions): [string, number][] {
  if (!opts || typeof opts.name !== 'string' || !/^[A-Za-z0-9_.-]{1,64}$/.test(opts.name)) {
    throw new UffdMigrateError(`expected options.name of 1-64 letters, digits, '_', '.', '-', got ${JSON.stringify(opts?.name)}`, ErrorCode.INVALID_ARG)
  }
  const entries = Object.entries(opts.regions ?? {})
  if (entries.length === 0) throw new UffdMigrateError('expected options.regions to name at least one region', ErrorCode.INVALID_ARG)
  return entries
}

/** Guest.setBandwidth()'s argument, checked: at least one limit. */
export function bandwidthLimits(o: Pick<MigrateOptions, 'maxBandwidth' | 'maxPostcopyBandwidth'>): Partial<BandwidthLimits> {
  if (!o || (o.maxBandwidth === undefined && o.maxPostcopyBandwidth === undefined)) {
    throw new UffdMigrateError('expected maxBandwidth or maxPostcopyBandwidth (bytes a second, 0: no limit)', ErrorCode.INVALID_ARG)
  }
  return {
    ...(o.maxBandwidth !== undefined ? { precopyBytesPerSec: validateBandwidth(o.maxBandwidth, 'maxBandwidth') } : {}),
    ...(o.maxPostcopyBandwidth !== undefined ? { postcopyBytesPerSec: validateBandwidth(o.maxPostcopyBandwidth, 'maxPostcopyBandwidth') } : {}),
  }
}

/** A bandwidth limit in bytes a second: 0 (none) or from 1 MiB/s (MIN_BANDWIDTH_BYTES_PER_SEC); fractions are dropped. */
export function validateBandwidth(v: unknown, name: string, zeroMeans = 'no limit'): number {
  if (v === undefined) return 0
  if (typeof v !== 'number' || !Number.isFinite(v) || (v !== 0 && v < MIN_BANDWIDTH_BYTES_PER_SEC) || v > Number.MAX_SAFE_INTEGER) {
    throw new UffdMigrateError(`expected ${name} in bytes a second: 0 (${zeroMeans}) or at least ${MIN_BANDWIDTH_BYTES_PER_SEC} (1 MiB/s), got ${JSON.stringify(v)}`, ErrorCode.INVALID_ARG)
  }
  return Math.floor(v)
}

/** The agent's nice value: explicit (a number, or a CLI string), $UFFD_MIGRATE_AGENT_NICE, or 0. */
export function resolveAgentNice(explicit?: number | string, name = 'options.agentNice'): number {
  return resolveIntegerSetting({ explicit, name, env: 'UFFD_MIGRATE_AGENT_NICE', fallback: 0, min: 0, max: 19, what: 'an integer nice value from 0 to 19' })
}

/** The bulk socket's kernel settings (src/agent/socket-settings.ts), from the environment: each a byte count, 0 for the kernel's own. */
export interface SocketTuning {
  /** $UFFD_MIGRATE_BULK_BUFFER_BYTES: post-copy's buffers (pre-copy's: at least 4 MiB). */
  bulkBufferBytes: number
  /** $UFFD_MIGRATE_PUSH_UNSENT_BYTES: the most the post-copy push holds written but not sent. */
  pushUnsentBytes: number
}

export function resolveSocketTuning(env: NodeJS.ProcessEnv = process.env): SocketTuning {
  const bytes = (name: string, fallback: number) =>
    resolveIntegerSetting({ name, env: name, fallback, min: 0, max: 1 << 30, what: "a byte count from 0 (the kernel's own) to 1073741824" }, env)
  return { bulkBufferBytes: bytes('UFFD_MIGRATE_BULK_BUFFER_BYTES', DEFAULT_BULK_SOCKET_BUFFER_BYTES), pushUnsentBytes: bytes('UFFD_MIGRATE_PUSH_UNSENT_BYTES', DEFAULT_PUSH_UNSENT_BYTES) }
}

/** The shared token: explicit, $UFFD_MIGRATE_TOKEN, or the file $UFFD_MIGRATE_TOKEN_FILE. */
/** Whether migrations are sealed: an explicit boolean, else $UFFD_MIGRATE_ENCRYPT ('1' or '0'), else false. */
export function resolveEncrypt(explicit: unknown, name = 'options.encrypt', env: NodeJS.ProcessEnv = process.env): boolean {
  if (explicit !== undefined) {
    if (typeof explicit !== 'boolean') throw new UffdMigrateError(`expected ${name} to be true or false, got ${JSON.stringify(explicit)}`, ErrorCode.INVALID_ARG)
    return explicit
  }
  const v = env.UFFD_MIGRATE_ENCRYPT
  if (v === undefined || v === '' || v === '0') return false
  if (v === '1') return true
  throw new UffdMigrateError(`expected UFFD_MIGRATE_ENCRYPT to be 1 or 0, got ${JSON.stringify(v)}`, ErrorCode.INVALID_ARG)
}

export function resolveToken(explicit?: string): string {
  const token =
    explicit ??
    process.env.UFFD_MIGRATE_TOKEN ??
    (process.env.UFFD_MIGRATE_TOKEN_FILE ? readTokenFile(process.env.UFFD_MIGRATE_TOKEN_FILE) : undefined)
  if (!token) {
    throw new UffdMigrateError(
      'no migration token: give both hosts the same secret with --token-file FILE or UFFD_MIGRATE_TOKEN (e.g. `openssl rand -hex 32`)',
      ErrorCode.AUTH,
    )
  }
  if (token.length < 16) throw new UffdMigrateError('the migration token must be at least 16 characters', ErrorCode.AUTH)
  return token
}

export function readTokenFile(path: string): string {
  try {
    return readFileSync(path, 'utf8').trim()
  } catch (err) {
    throw new UffdMigrateError(`cannot read the token file ${path}: ${(err as NodeJS.ErrnoException).code}`, ErrorCode.AUTH)
  }
}
