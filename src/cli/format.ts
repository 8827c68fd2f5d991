/** Human-readable progress line and report table. */
import type { MigrationReport } from '../agent/report'
import type { PreflightReport } from '../agent/source/preflight'
import type { Progress } from '../agent/source/index'
import type { MovedStatus } from '../control'
import { bytes, limitsText } from '../units'

/** `status` lines of a guest that moved away: where to, and what keeps its process here meanwhile. */
export function movedLines(m: MovedStatus): string[] {
  const f = m.forwarding
  const lines = [`moved to ${m.to}: the service runs there now`]
  if (f) lines.push(`forwarding this address's clients there: ${f.open} open connection(s)${f.held ? ` and ${f.held} held` : ''}; so far ${f.connections} connection(s) relayed and ${f.requests} request(s) proxied, ${bytes(f.bytes)} through those that ended`)
  if (m.exitsAfterIdleMs === undefined) lines.push(`this process runs on: the service keeps it (a 'moved' listener, or exitOnMoved false)`)
  else if (f) lines.push(`this process exits once no client connection is open and none came for ${m.exitsAfterIdleMs} ms (${f.open || f.held ? 'clients use it now' : `idle for ${f.idleMs} ms`})`)
  return lines
}

/** The same in a few words, for `list`. */
export function movedSummary(m: MovedStatus): string {
  return `to ${m.to}${m.forwarding ? `, forwarding ${m.forwarding.open} connection(s)` : ''}`
}

export function progressLine(p: Progress): string {
  // rounded down: a page left is never 100.0% local
  const done = p.totalPages ? Math.floor((1 - p.pagesLeft / p.totalPages) * 1000) / 10 : 0
  const round = p.phase === 'precopy' ? ` round ${p.round}${p.tracker ? ` (${p.tracker})` : ''}` : ''
  const limit = p.limitBytesPerSec ? ` (limit ${bytes(p.limitBytesPerSec)}/s)` : ''
  // (recovering before the destination said whether it took HANDOFF: the operator's first question is where it runs)
  const unconfirmed = p.phase === 'recovering' && p.serviceRunsOn === 'unknown' ? '; the hand-off is not confirmed yet: asking the destination whether the service runs there' : ''
  const why = p.brokenBy || unconfirmed ? `  (${p.brokenBy ?? ''}${unconfirmed})` : ''
  return `${p.phase}${round}  sent ${bytes(p.bytesSent)}  ${bytes(p.bytesPerSec)}/s${limit}  pages left ${p.pagesLeft} (${done.toFixed(1)}% local)${why}`
}

/** send --dry-run's answer: what both sides found, one line each. */
export function formatPreflight(r: PreflightReport): string {
  const d = r.destination
  return [
    `dry run: a ${r.mode} migration to ${r.to} would start now; nothing moved, the service runs on here`,
    `  connections        authenticated in ${r.connectMs.toFixed(1)} ms (the destination answered in ${r.totalMs.toFixed(1)} ms in all)`,
    `  region table       matches: ${r.regions.map((g) => `${g.name} ${bytes(g.sizeBytes)}`).join(', ')}`,
    `  memory             ${r.residentBytes !== undefined ? `${bytes(r.residentBytes)} resident here` : 'not counted here (a kernel without PAGEMAP_SCAN)'}; ` +
      (d.headroomBytes !== undefined ? `${bytes(d.headroomBytes)} can be allocated there (limited by ${d.limitedBy})` : 'the destination does not check (UFFD_MIGRATE_MEMORY_CHECK=0)'),
    `  tracker            ${r.tracker.kind}: ${r.tracker.reason}`,
    `  streams            ${d.streams} bulk connection(s) granted`,
    `  encryption         ${r.encrypted ? 'on: every connection sealed (AES-256-GCM over X25519)' : 'off (the link is authenticated, not encrypted: --encrypt)'}`,
    `  migration id       ${r.migration} (the destination logged its preflight line with it)`,
  ].join('\n')
}

export function formatReport(r: MigrationReport): string {
  const ms = (v: number) => `${v.toFixed(1)} ms`
  const lines: string[] = []
  lines.push(`migration ${r.migration} to ${r.to}, mode ${r.mode}: ${r.regions.map((g) => `${g.name} ${bytes(g.sizeBytes)}`).join(', ')}`)
  lines.push(`  total time         ${ms(r.totalMs)}`)
  lines.push(`  downtime           ${ms(r.downtimeMs)}   (stopped on the source -> resumed on the destination; clock offset ${r.clockOffsetMs.toFixed(2)} ms, rtt ${r.clockRttMs.toFixed(2)} ms)`)
  lines.push(`  pause wait         ${ms(r.pauseWaitMs)}   (before the downtime: the service's event loop getting to the pause request; it still served)`)
  const b = r.downtimeBreakdownMs
  const call = r.pauseCallMs !== undefined ? ` (${ms(r.pauseCallMs)} of it on the service's thread)` : ''
  if (b) lines.push(`                     pause() ${ms(b.pause)}${call}, final scan ${ms(b.finalScan)}, hand-off sent ${ms(b.handoffTransfer)}, discard ${ms(b.discard)}, restore ${ms(b.restore)}`)
  lines.push(`  bytes on the wire  ${bytes(r.bytesOnWire)}`)
  lines.push(`  pages sent         data ${r.pages.data}, zero ${r.pages.zero}, free ${r.pages.free}; resent ${r.pagesResent}; twice after hand-off ${r.pagesSentTwiceAfterHandoff}`)
  if (r.streams && r.streams > 1) lines.push(`  streams            ${r.streams} bulk connections in the pre-copy rounds`)
  if (r.encrypted) lines.push('  encryption         every connection sealed (AES-256-GCM over X25519)')
  if (r.takeover) {
    lines.push(`  agent takeover     the migration agent crashed in phase ${r.takeover.crashedInPhase} (${r.takeover.message}); a new one took the migration over (the rounds and the pause window's figures went with the old one)`)
  }
  if (r.bandwidthLimits) {
    lines.push(`  bandwidth limits   ${limitsText(r.bandwidthLimits)} (as it ended; the hand-off and faults never limited)`)
  }
  if (r.tracker) {
    const t = r.tracker
    const starved = t.starved ? ` (its thread starved ${t.starved} time(s) by other work on its CPU: normal class meanwhile)` : ''
    lines.push(`  tracker            ${t.kind}${t.faults !== undefined ? `, ${t.faults} write faults resolved${starved}` : ''}: ${t.reason}`)
  }
  if (r.rounds.length) {
    const cr = r.convergenceRate
    const against = cr ? ` (against ${bytes(cr.bytesPerSec)}/s, ${cr.from === 'measured' ? 'the rate the rounds measured' : 'the switchover bandwidth given'})` : ''
    lines.push(`  pre-copy           ${r.rounds.length} round(s), stopped: ${r.precopyStop}${against}`)
    lines.push('    round  data pages  zero pages  free pages  hot pages       bytes   time')
    for (const x of r.rounds) {
      lines.push(`    ${String(x.round).padStart(5)}  ${String(x.dataPages).padStart(10)}  ${String(x.zeroPages).padStart(10)}  ${String(x.freePages).padStart(10)}  ${String(x.hotPages).padStart(9)}  ${bytes(x.bytes).padStart(10)}  ${ms(x.durationMs)}`)
    }
  }
  const pc = r.postcopy
  lines.push(`  hand-off           ${r.discardedPages} old copies dropped at the destination (during pre-copy and at the hand-off), ${r.pagesMissingAtHandoff} pages missing there when the service resumed`)
  lines.push(`  post-copy          strategy ${pc.strategy}, faults served by ${pc.demandPath === 'native' ? 'native threads' : 'the agents\' loops'}; network faults ${pc.networkFaults} (on zero pages ${pc.networkFaultsOnZeroPages}, ${pc.readAheadPages ?? 0} pages read ahead), local zero faults ${pc.localZeroFaults}`)
  const bp = pc.faultLatencyByPathUs
  const byPath = bp && bp.push.count ? ` (${bp.reply.count} by their reply: p99 ${bp.reply.p99.toFixed(0)} us; ${bp.push.count} by the push: p99 ${bp.push.p99.toFixed(0)} us)` : ''
  lines.push(`                     fault latency p50 ${pc.faultLatencyUs.p50.toFixed(0)} us, p99 ${pc.faultLatencyUs.p99.toFixed(0)} us${byPath}; pushed ${pc.pushedPages}, on demand ${pc.demandPages}; settled after ${ms(pc.timeToSettledMs)}${pc.recoveries ? `; link recovered ${pc.recoveries}x${pc.protocolBreaks ? ` (${pc.protocolBreaks} after a malformed frame)` : ''}` : ''}`)
  return lines.join('\n')
}

/**
 * Progress of `send` on stderr: on a terminal one line redrawn in place; on
 * anything else (a log, a pipe, CI) a line on each phase change and every
 * few seconds. quiet: nothing.
 */
export class ProgressPrinter {
  private lastPhase = ''
  private lastLineAt = 0
  private drawn = false

  constructor(
    private readonly out: NodeJS.WritableStream,
    private readonly quiet: boolean,
    private readonly tty: boolean,
    private readonly everyMs = 5000,
  ) {}

  update(p: Progress, now = Date.now()): void {
    if (this.quiet) return
    if (this.tty) {
      this.out.write(`\r\x1b[2K${progressLine(p)}`)
      this.drawn = true
      return
    }
    if (p.phase === this.lastPhase && now - this.lastLineAt < this.everyMs) return
    this.lastPhase = p.phase
    this.lastLineAt = now
    this.out.write(`uffd-migrate: ${progressLine(p)}\n`)
  }

  clear(): void {
    if (this.drawn) this.out.write('\r\x1b[2K')
    this.drawn = false
  }
}
