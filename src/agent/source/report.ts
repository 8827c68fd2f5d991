/** The source's migration report, from what each part measured. */
import type { Region } from '../../region'
import type { MigrationReport, MigrationMode, RoundReport } from '../report'
import type { Postcopy } from './postcopy'
import type { Sender } from './sender'

export interface ReportInputs {
  mode: MigrationMode
  to: string
  regions: Region[]
  pageSize: number
  rounds: RoundReport[]
  precopyStop: string
  /** Source clock, ms. */
  t0: number
  pauseAt: number
  postStart: number
  settledAt: number
  /** Destination clock, ms. */
  resumedAtDest: number
  clock: { offsetMs: number; rttMs: number }
  bytesOnWire: number
  discarded: number
  /** The destination's SETTLED report. */
  stats: Record<string, unknown>
  sender: Sender
  postcopy: Postcopy
  pushLog: boolean
}

export function buildReport(x: ReportInputs): MigrationReport {
  const num = (k: string) => (typeof x.stats[k] === 'number' ? (x.stats[k] as number) : 0)
  const lat = (typeof x.stats.faultLatencyUs === 'object' && x.stats.faultLatencyUs) as MigrationReport['postcopy']['faultLatencyUs'] | false
  const c = x.sender.counts
  return {
    mode: x.mode,
    to: x.to,
    regions: x.regions.map((r) => ({ name: r.name, sizeBytes: r.sizeBytes })),
    pageSize: x.pageSize,
    rounds: x.rounds,
    precopyStop: x.precopyStop,
    totalMs: x.settledAt - x.t0,
    downtimeMs: x.resumedAtDest - x.clock.offsetMs - x.pauseAt,
    clockOffsetMs: x.clock.offsetMs,
    clockRttMs: x.clock.rttMs,
    bytesOnWire: x.bytesOnWire,
    pages: { data: c.data, zero: c.zero, free: c.free },
    pagesResent: c.resent,
    // the source cannot send a page twice by construction (pending map);
    // the destination counts what it actually received twice
    pagesSentTwiceAfterHandoff: num('pagesReceivedTwice'),
    discardedPages: x.discarded,
    postcopy: {
      strategy: x.mode === 'precopy' ? 'none' : x.postcopy.policy?.name ?? 'none',
      networkFaults: num('networkFaults'),
      localZeroFaults: num('localZeroFaults'),
      networkFaultsOnZeroPages: num('networkFaultsOnZeroPages'),
      faultLatencyUs: lat || { count: 0, p50: 0, p99: 0, max: 0, mean: 0 },
      pushedPages: x.postcopy.pushed,
      demandPages: x.postcopy.demand,
      timeToSettledMs: x.settledAt - x.postStart,
      recoveries: x.postcopy.recoveries,
      pagesLocalAtDestination: num('pagesLocal'),
      ...(x.pushLog ? { pushLog: x.postcopy.pushLog } : {}),
    },
  }
}
