/**
 * The operator's log: the words of each line at each turn of a migration, on
 * each side (the README's Troubleshooting lists them; src/log.ts writes them,
 * as text or JSON, with their event names). Written by the agent's thread
 * (worker.ts), so they come even while the service's thread is blocked in a fault.
 */
import { ErrorCode } from '../errors'
import { bytes, limitsText, perSecond } from '../units'
import type { DestMilestone } from './destination/hooks'
import type { MigrationReport } from './report'
import type { BandwidthLimits } from './source/bandwidth'
import type { PreflightReport } from './source/preflight'
import type { LogEvent, LogLevel } from '../log'

/** The guest's regions, as the lines count them. */
export interface RegionSizes {
  sizeBytes: number
  pageCount: number
}

/** The destination's turns (its refusals and recovery have lines of their own, its failures `destinationTrouble`). */
export function destinationLine(m: DestMilestone, regions: RegionSizes[]): string {
  const totalPages = regions.reduce((n, r) => n + r.pageCount, 0)
  switch (m.kind) {
    case 'began':
      return `a migration from ${m.peer} began${m.migration ? ` (migration ${m.migration}${m.encrypted ? ', encrypted' : ''})` : ''}: ${bytes(regions.reduce((n, r) => n + r.sizeBytes, 0))} in ${regions.length} region(s)`
    case 'resumed':
      return `the service runs here (${m.afterHandoffMs === undefined ? 'a new agent heard it after the last one crashed' : `${m.afterHandoffMs.toFixed(1)} ms after the hand-off arrived`}); ` +
        (m.pagesLeft ? `${m.pagesLeft} of ${totalPages} pages still to come from ${m.peer} (post-copy)` : 'every page is here')
    case 'back':
      return `the source came back after ${m.brokenMs.toFixed(0)} ms; post-copy goes on (${m.pagesLeft} pages to come)`
    case 'preflight':
      return `a preflight check from ${m.peer} passed (migration ${m.migration}): the region table matches` +
        (m.residentBytes !== undefined && m.room ? `; ${bytes(m.residentBytes)} resident at the source, ${bytes(m.room.bytes)} can be allocated here (limited by ${m.room.limitedBy})` : '') +
        '; nothing moved, listening for the next source'
    case 'settled':
      return `settled: every page is here, ${m.afterResumeMs.toFixed(0)} ms after the service resumed ` +
        `(${m.networkFaults} fault(s) fetched over the network${m.networkFaults ? `, p99 ${m.p99Us.toFixed(0)} us` : ''}` +
        `${m.recoveries ? `; the link recovered ${m.recoveries}x${m.protocolBreaks ? `, ${m.protocolBreaks} after a malformed frame` : ''}` : ''}); the guest can move on`
  }
}

/** The source's turns: a migration to `to` began, changed phase, moved or failed. */

export const sourceLine = {
  began: (to: string, mode: string, limits?: BandwidthLimits, switchoverBytesPerSec?: number, migration?: string) =>
    `a migration to ${to} began (${migration ? `migration ${migration}, ` : ''}mode ${mode}${limits && (limits.precopyBytesPerSec || limits.postcopyBytesPerSec) ? `; bandwidth limits: ${limitsText(limits)}` : ''}` +
    `${switchoverBytesPerSec ? `; pre-copy converges against a switchover bandwidth of ${perSecond(switchoverBytesPerSec)}` : ''})`,
  /** A new agent after the one that ran the migration crashed with the service paused (src/agent-handle.ts). */
  takeover: (to: string, phase: string) =>
    `a new migration agent takes over the migration to ${to} (the last one crashed in phase ${phase}, the service paused): dialling in with its session to learn whether the hand-off arrived`,
  /** The operator changed the limits of the running migration (set-bandwidth). */
  limits: (to: string, l: BandwidthLimits) => `the migration to ${to} now runs with bandwidth limits: ${limitsText(l)}`,
  /** A phase change worth a line (from the hand-off on): its event and words, or undefined. */
  phase(to: string, from: string, phase: string, recoveryTimeoutMs: number, brokenBy?: string): [LogEvent, string, LogLevel] | undefined {
    if (phase === 'postcopy' && from === 'handoff') return ['handed-off', `handed off to ${to}: the service runs there now; this process keeps its memory until every page is there`, 'info']
    if (phase === 'recovering') return ['link-broken', `the link to ${to} broke after the hand-off${brokenBy ? ` (${brokenBy})` : ''}; dialling it again for up to ${recoveryTimeoutMs} ms`, 'warn']
    if (phase === 'postcopy' && from === 'recovering') return ['link-back', `the link to ${to} is back; post-copy goes on`, 'info']
    return undefined
  },
  /** A preflight (send --dry-run): a migration would start now, or what it would meet. */
  preflight: (to: string, r: PreflightReport) =>
    `a preflight check to ${to} passed (migration ${r.migration}): a migration would start now` +
    (r.residentBytes !== undefined && r.destination.headroomBytes !== undefined ? ` (${bytes(r.residentBytes)} resident here, ${bytes(r.destination.headroomBytes)} can be allocated there)` : '') + '; nothing moved',
  preflightFailed: (to: string, e: { code: string; message: string }) => `a preflight check to ${to} failed: ${e.message} [${e.code}]; nothing moved`,
  moved: (to: string, r: MigrationReport) => `moved to ${to}: settled there; downtime ${r.downtimeMs.toFixed(1)} ms, total ${r.totalMs.toFixed(0)} ms`,
  // (a cancel's message says where the service runs already)
  failed: (to: string, e: { code: string; message: string; afterHandoff?: boolean }) =>
    e.code === ErrorCode.CANCELLED
      ? `the migration to ${to} was cancelled: ${e.message} [${e.code}]`
      : `the migration to ${to} failed: ${e.message} [${e.code}]; ${e.afterHandoff ? 'after the hand-off: the service does not run here' : 'the service runs on here'}`,
}

/** What went wrong at the destination, and what the service can still count on. */
export const destinationTrouble = {
  failed: (e: { code: string; message: string }) =>
    e.code === ErrorCode.HANDOFF
      // a state that could not be restored: the service never started here and runs on at the source
      ? `the migration ended at the hand-off: ${e.message} [${e.code}]; the service runs on at the source`
      : `the migration failed after the hand-off: ${e.message} [${e.code}]; the pages that had not arrived cannot come now`,
  /** A preflight (send --dry-run) that failed a check here: nothing was to move. */
  preflightFailed: (e: { code?: string; message: string }) =>
    `a preflight check failed here: ${e.message} [${e.code ?? ErrorCode.GENERIC}]; nothing moved, listening for the next source`,
  sessionEnded: (e: { code?: string; message: string }) =>
    `a migration ended before the hand-off (${e.message}) [${e.code ?? ErrorCode.GENERIC}]; listening for the next source`,
  takeover: (w: { peer: string; port: number }, pagesLeft: number) =>
    `a new migration agent takes over after the last one crashed: ${pagesLeft} page(s) still to come from ${w.peer}; listening again on port ${w.port} for the source`,
  /** Written by the exit watch (a native thread) as it ends the process (deferredLogLine()). */
  notTaken: (what: string, waitedMs: number, exitCode: number) =>
    `${what}, and the service's main thread did not take the failure within ${waitedMs} ms ` +
    `(it waits for a page that cannot arrive now): ending the process with exit code ${exitCode}`,
}

/** Either side's agent. */
export const agentTrouble = {
  crashed: (err: unknown) => `the migration agent crashed: ${(err as Error)?.stack ?? String(err)}`,
  stillYielding: (nice: number) => `the agent's thread stays at nice ${nice} after post-copy: lowering a nice value needs CAP_SYS_NICE or RLIMIT_NICE`,
}
