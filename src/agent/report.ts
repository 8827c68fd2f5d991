/** The migration report: returned by migrate(), printed by the CLI, one schema. */
import type { LatencySummary } from '../stats'

export type MigrationMode = 'precopy' | 'postcopy' | 'hybrid'

export interface RoundReport {
  round: number
  /** Pages sent with payload this round. */
  dataPages: number
  /** Pages sent as ranges without payload (zero / never populated / free). */
  zeroPages: number
  freePages: number
  /** Pages held back as hot (written in consecutive rounds). */
  hotPages: number
  /** Hot pages whose old copy the destination dropped during this round (not in the pause window). */
  stalePages?: number
  bytes: number
  durationMs: number
}

export interface MigrationReport {
  mode: MigrationMode
  to: string
  /** The migration's id: both hosts' log lines about it carry it (JSON `migration`), and `status` shows it. */
  migration: string
  regions: { name: string; sizeBytes: number }[]
  pageSize: number
  rounds: RoundReport[]
  /** Why pre-copy stopped: 'converged' | 'round-limit' | 'not-converging' | 'postcopy'. */
  precopyStop: string
  /**
   * The stop-and-copy rate pre-copy's last convergence check assumed (bytes a second): the rounds' best measured
   * rate, or the operator's switchoverBandwidth. Absent in post-copy mode.
   */
  convergenceRate?: { bytesPerSec: number; from: 'measured' | 'switchover-bandwidth' }
  totalMs: number
  /**
   * A new agent wrote this report: the one that ran the migration crashed in `crashedInPhase` with the service paused,
   * and this one took post-copy over (the rounds and the pause window's figures went with the old one; downtimeMs is
   * from one clock sample).
   */
  takeover?: { crashedInPhase: string; message: string }
  /**
   * The service stopped on the source (its main thread began pause()) -> it resumed on the destination (clock
   * offset corrected): the time it ran nowhere.
   */
  downtimeMs: number
  /**
   * Before the downtime: the agent asked for the pause -> the service's event loop got to it (a busy loop is
   * late). The service still ran and served in that time; its writes were still tracked.
   */
  pauseWaitMs: number
  /** downtimeMs split (they sum to it): pause() on the source and its state reaching the agent, final scan, HANDOFF sent and received, discard list applied, restore on the destination. */
  downtimeBreakdownMs?: { pause: number; finalScan: number; handoffTransfer: number; discard: number; restore: number }
  /** The part of downtimeBreakdownMs.pause on the service's main thread: its pause() and the encoding of its state (the rest: the state reaching the agent's thread). */
  pauseCallMs?: number
  clockOffsetMs: number
  clockRttMs: number
  bytesOnWire: number
  /**
   * The source's dirty-page tracker (wp-async or sync-wp), why this host got it, and (sync-wp) the write faults it
   * resolved and how often other work starved its idle-class fault thread (then put back in the normal class).
   */
  tracker?: { kind: 'wp-async' | 'sync-wp'; reason: string; faults?: number; starved?: number }
  /** Bulk connections the pre-copy rounds used (1: bulk alone; more when asked with `streams` and granted). */
  streams?: number
  /** Every connection was sealed (AES-256-GCM; either side asked). */
  encrypted: boolean
  /** The operator's bandwidth limits as the migration ended (bytes a second, 0: none); absent when none was ever set. */
  bandwidthLimits?: { precopyBytesPerSec: number; postcopyBytesPerSec: number }
  /** Who placed the pages arriving on the bulk connection at the destination: its native thread or its agent's loop (UFFD_MIGRATE_BULK=js, or no addon support). */
  bulkReceive?: 'native' | 'js'
  /** CPU time of each side's agent (its worker thread and native demand thread), from the start to settled, ms; absent when unmeasured. */
  cpuMs?: { source: number; destination: number }
  pages: {
    data: number
    zero: number
    free: number
  }
  /** Pages sent with payload more than once over the whole migration. */
  pagesResent: number
  /** Pages sent more than once after the hand-off (invariant 2: always 0). */
  pagesSentTwiceAfterHandoff: number
  /** Old copies the destination dropped: at the hand-off (its discard list) and during pre-copy (hot pages, hybrid's last passes). */
  discardedPages: number
  /** Pages the destination lacked when the service resumed there: what post-copy moves (pushed + on demand + freed). */
  pagesMissingAtHandoff: number
  postcopy: {
    strategy: string
    /** Who served the faults: 'native' (the demand connection's threads) or 'js' (the urgent channel, in the agents' loops). */
    demandPath: 'native' | 'js'
    /** Demand faults served over the network (page requests). */
    networkFaults: number
    /** Faults on zero/free pages resolved locally on the destination. */
    localZeroFaults: number
    /** Network faults on pages the source had announced as zero or free (always 0). */
    networkFaultsOnZeroPages: number
    /** Pages asked beyond the faulted ones (demand read-ahead after sequential faults; native demand path only). */
    readAheadPages: number
    faultLatencyUs: LatencySummary
    /**
     * The native demand path's faults by what answered them: `reply`, the
     * page request's own reply (timed to its install); `push`, the push's
     * frame, the page already on its way when the fault came (seen up to
     * 1 ms late: an upper bound). Absent on the JS demand path.
     */
    faultLatencyByPathUs?: { reply: LatencySummary; push: LatencySummary }
    pushedPages: number
    demandPages: number
    timeToSettledMs: number
    /** Times the link broke during post-copy and the source reconnected. */
    recoveries: number
    /** Of those, frames either side refused as malformed (a changed byte, a bug), each recovered: three per side, the fourth ends the migration. */
    protocolBreaks: number
    /** Pages local at the destination when it settled, from its SETTLED report (0 only if that report never arrived). */
    pagesLocalAtDestination: number
    /** The post-copy push order, run by run (with `pushLog: true`). */
    pushLog?: { region: number; firstPage: number; pageCount: number }[]
  }
}
