/** The source's migration report, from what each part measured. */
import type { Region } from '../../region'
import type { MigrationReport, MigrationMode, RoundReport } from '../report'
import type { Postcopy } from './postcopy'
import type { Sender } from './sender'

export interface ReportInputs {
  mode: MigrationMode
  to: string
  migration: string
  regions: Region[]
  pageSize: number
  rounds: RoundReport[]
  precopyStop: string
  convergenceRate?: MigrationReport['convergenceRate']
  /** Source clock, ms. */
  t0: number
  /** pause() asked of the service, and when it stopped (its loop got to the request). */
  pauseAt: number
  stoppedAt: number
  /** The service's state posted by its main thread (pause() and the encoding done), pause() returned here, final scan done, HANDOFF drained (source clock). */
  marks: { postedAt?: number; pausedAt?: number; scannedAt?: number; sentAt?: number }
  postStart: number
  settledAt: number
  /** Destination clock, ms. */
  resumedAtDest: number
  clock: { offsetMs: number; rttMs: number }
  bytesOnWire: number
  /** The source agent's CPU time, ms (undefined: not measured). */
  sourceCpuMs: number | undefined
  discarded: number
  missingAtHandoff: number
  /** The destination's SETTLED report. */
  stats: Record<string, unknown>
  sender: Sender
  postcopy: Postcopy
  pushLog: boolean
  /** The dirty-page tracker, why it was chosen, and the write faults it resolved (sync-wp). */
  tracker?: MigrationReport['tracker']
  streams?: number
  /** The connections were sealed. */
  encrypted?: boolean
  bandwidthLimits?: MigrationReport['bandwidthLimits']
}

export function buildReport(x: ReportInputs): MigrationReport {
  const num = (k: string) => (typeof x.stats[k] === 'number' ? (x.stats[k] as number) : 0)
  const lat = (typeof x.stats.faultLatencyUs === 'object' && x.stats.faultLatencyUs) as MigrationReport['postcopy']['faultLatencyUs'] | false
  const byPath = (typeof x.stats.faultLatencyByPathUs === 'object' && x.stats.faultLatencyByPathUs) as MigrationReport['postcopy']['faultLatencyByPathUs'] | false
  const c = x.sender.counts
  return {
    mode: x.mode,
    to: x.to,
    migration: x.migration,
    regions: x.regions.map((r) => ({ name: r.name, sizeBytes: r.sizeBytes })),
    pageSize: x.pageSize,
    rounds: x.rounds,
    precopyStop: x.precopyStop,
    ...(x.convergenceRate ? { convergenceRate: x.convergenceRate } : {}),
    totalMs: x.settledAt - x.t0,
    downtimeMs: x.resumedAtDest - x.clock.offsetMs - x.stoppedAt,
    pauseWaitMs: x.stoppedAt - x.pauseAt,
    downtimeBreakdownMs: breakdown(x),
    ...pauseCall(x),
    clockOffsetMs: x.clock.offsetMs,
    clockRttMs: x.clock.rttMs,
    bytesOnWire: x.bytesOnWire,
    pages: { data: c.data, zero: c.zero, free: c.free },
    pagesResent: c.resent,
    // the source cannot send a page twice by construction (pending map);
    // the destination counts what it actually received twice
    pagesSentTwiceAfterHandoff: num('pagesReceivedTwice'),
    discardedPages: x.discarded + x.rounds.reduce((n, r) => n + (r.stalePages ?? 0), 0),
    pagesMissingAtHandoff: x.missingAtHandoff,
    ...(x.tracker ? { tracker: x.tracker } : {}),
    ...(x.streams ? { streams: x.streams } : {}),
    encrypted: x.encrypted ?? false,
    ...(x.bandwidthLimits ? { bandwidthLimits: x.bandwidthLimits } : {}),
    ...(x.stats.bulkReceive === 'native' || x.stats.bulkReceive === 'js' ? { bulkReceive: x.stats.bulkReceive } : {}),
    ...(x.sourceCpuMs !== undefined && typeof x.stats.cpuMs === 'number' ? { cpuMs: { source: x.sourceCpuMs, destination: x.stats.cpuMs } } : {}),
    postcopy: {
      strategy: x.mode === 'precopy' ? 'none' : x.postcopy.policy?.name ?? 'none',
      demandPath: x.postcopy.nativeDemand ? 'native' : 'js',
      networkFaults: num('networkFaults'),
      localZeroFaults: num('localZeroFaults'),
      networkFaultsOnZeroPages: num('networkFaultsOnZeroPages'),
      readAheadPages: num('readAheadPages'),
      faultLatencyUs: lat || { count: 0, p50: 0, p99: 0, max: 0, mean: 0 },
      ...(byPath ? { faultLatencyByPathUs: byPath } : {}),
      pushedPages: x.postcopy.pushed,
      demandPages: x.postcopy.demand,
      timeToSettledMs: x.settledAt - x.postStart,
      recoveries: x.postcopy.recoveries,
      protocolBreaks: x.postcopy.protocolBreaks + num('protocolBreaks'), // (each side counts the frames it refused)
      pagesLocalAtDestination: num('pagesLocal'),
      ...(x.pushLog ? { pushLog: x.postcopy.pushLog } : {}),
    },
  }
}

/** The main thread's part of the downtime's pause part (the service's pause() and its state's encoding), within it. */
function pauseCall(x: ReportInputs): { pauseCallMs?: number } {
  const { postedAt, pausedAt } = x.marks
  if (postedAt === undefined || pausedAt === undefined) return {}
  return { pauseCallMs: Math.min(Math.max(postedAt - x.stoppedAt, 0), pausedAt - x.stoppedAt) }
}

/**
 * Where the downtime went, in order: the service's pause(), the final scan
 * (and the end of write tracking), HANDOFF leaving and crossing (until the
 * destination has it), the discard list, the service's restore. Stamps of
 * the destination are moved onto the source's clock with the measured offset.
 */
function breakdown(x: ReportInputs): MigrationReport['downtimeBreakdownMs'] {
  const m = x.marks, d = x.postcopy.destHandoff
  if (m.pausedAt === undefined || m.scannedAt === undefined || !d) return undefined
  const handoffAt = d.handoffAtMs - x.clock.offsetMs, discardedAt = d.discardedAtMs - x.clock.offsetMs
  return {
    pause: m.pausedAt - x.stoppedAt,
    finalScan: m.scannedAt - m.pausedAt,
    handoffTransfer: handoffAt - m.scannedAt,
    discard: discardedAt - handoffAt,
    restore: x.resumedAtDest - x.clock.offsetMs - discardedAt,
  }
}
