/** What the source is given: its options and the hooks by which it reaches the service (through the worker). */
import type { Clock } from '../clock'
import type { PrepagingOptions } from '../prepaging'
import type { MigrationMode } from '../report'
import type { TrackerOption } from '../tracker'
import type { TrackerKind } from '../tracker-choice'
import type { Dialer } from './link'
import type { SourcePhase } from './machine'

export interface SourceOptions {
  to: string
  /** The migration's session id (the destination pairs connections by it; a takeover dials in with it); default: a fresh one. */
  session?: string
  mode: MigrationMode
  token: Buffer
  /** Downtime budget for convergence (precopy: the stop-and-copy must fit in it). */
  downtimeMs: number
  maxRounds: number
  connectTimeoutMs: number
  /** Post-copy: how long to keep dialling the destination again after the link broke (0: fail at once). */
  recoveryTimeoutMs: number
  /** 'resume': a destination lost after the hand-off has the service resume here (MigrateOptions.onDestinationLost). */
  onDestinationLost?: 'fail' | 'resume'
  /** A connection whose peer stops answering fails after this long (keepalive + TCP_USER_TIMEOUT; 0: never). */
  linkTimeoutMs: number
  /** Sent to the destination: a page request of its unanswered this long means this side is stuck (its default: 5000). */
  requestTimeoutMs?: number
  prepaging: PrepagingOptions
  /** Record the push order in the report (tests, benchmarks). */
  pushLog: boolean
  /** Bulk connections for the pre-copy rounds (1: bulk alone; the destination may grant fewer). */
  streams?: number
  /** Bytes a second the pre-copy rounds send over all bulk connections (0 or absent: no limit; bandwidth.ts). */
  maxBandwidth?: number
  /** Bytes a second the post-copy push sends (0 or absent: no limit); never the pages a fault waits for. */
  maxPostcopyBandwidth?: number
  /** Bytes a second pre-copy's convergence check expects of the hand-off (0 or absent: the rounds' measured rate). */
  switchoverBandwidth?: number
  /** Kernel socket buffers of the bulk connection (0: leave alone). */
  bulkBufferBytes: number
  /** Post-copy: the most the bulk socket holds written but not sent (0: no limit). */
  pushUnsentBytes?: number
  /** The service forwards its clients (guest.serve()): after SETTLED, wait up to forwardWaitMs for the destination's SERVICE ports. */
  forward?: boolean
  /** A served server is HTTP: the destination rehearses Node's HTTP server path before it answers REGIONS (src/forward-rehearsal.ts). */
  servesHttp?: boolean
  forwardWaitMs?: number
  /** Where the forwarder reaches the destination's service (default: the host of `to`). */
  serviceHost?: string
  /** From the hand-off, the agents' threads on both hosts run at this nice value (src/agent/yielding.ts; 0: no change). */
  postcopyNice: number
  /** A test hook (UFFD_MIGRATE_FAULT_INJECT=demand-stall, set by agent-main): the first demand connection after the hand-off is served this much later. */
  demandStallMs?: number
  /** Which dirty-page tracker (default: auto, the best this kernel offers). */
  tracker?: TrackerOption
  /** Seal every connection (AES-256-GCM, src/protocol/records.ts); the destination may insist on it too. */
  encrypt?: boolean
  /** Opens a connection (default TCP; the pure tier dials in memory). */
  dial?: Dialer
  clock?: Clock
}

/** What pause() gives: the service's state, and when it stopped (its main thread's clock; default: when it was asked). */
export interface PausedService {
  state: Uint8Array
  /** On this side's clock: from here the service no longer ran (the downtime starts); before it, its loop got to the request. */
  stoppedAtMs?: number
  /** On this side's clock: pause() returned and its state was encoded (the main thread's part of the pause window). */
  postedAtMs?: number
}

export interface SourceHooks {
  /** Ask the service to stop mutating; resolves with its msgpackr-encoded state. */
  pause(): Promise<PausedService>
  /** Migration failed after pause() and the service does not run on the destination: let it run again here. */
  resume(): void
  progress(p: Progress): void
  /** Free-page reports from the service since the last call: [region, firstPage, pageCount] triples. */
  takeFreed(): number[]
  /** The destination's service listens on these ports (per served server) of host: forward clients there. */
  forwardTo?(host: string, ports: (number | null)[]): void
  /** HANDOFF went: the agent's thread yields from now on (src/agent/yielding.ts). */
  postcopy?(): void
}

export interface Progress {
  phase: SourcePhase
  round: number
  bytesSent: number
  bytesPerSec: number
  pagesLeft: number
  totalPages: number
  /** The dirty-page tracker of this migration (once pre-copy began). */
  tracker?: TrackerKind
  /** Recovering: why the link counts as broken (a reset, a stuck destination ...). */
  brokenBy?: string
  /** Once HANDOFF went: where the service runs as far as the source knows ('unknown': the destination has not said yet). */
  serviceRunsOn?: 'source' | 'destination' | 'unknown'
  /** The bandwidth limit of this phase's bulk transfer, bytes a second (absent: none). */
  limitBytesPerSec?: number
}
