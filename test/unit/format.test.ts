/** The CLI's progress line and report lines (src/cli/format.ts). */
import { describe, expect, it } from 'vitest'
import { formatPreflight, formatReport, movedLines, movedSummary, progressLine } from '../../src/cli/format'
import type { PreflightReport } from '../../src/agent/source/preflight'
import type { MigrationReport } from '../../src/agent/report'
import { SourcePhase } from '../../src/agent/source/machine'

const base = { phase: SourcePhase.PRECOPY, round: 2, bytesSent: 3 * 2 ** 30, bytesPerSec: 64 * 2 ** 20, pagesLeft: 1, totalPages: 1000, tracker: 'wp-async' as const }

describe('progress line', () => {
  it('the round, the tracker, the rate and what is left; a page left is never 100.0% local', () => {
    expect(progressLine(base)).toBe('precopy round 2 (wp-async)  sent 3.0 GiB  64.0 MiB/s  pages left 1 (99.9% local)')
    expect(progressLine({ ...base, phase: SourcePhase.POSTCOPY, pagesLeft: 0 })).toBe('postcopy  sent 3.0 GiB  64.0 MiB/s  pages left 0 (100.0% local)')
  })

  it("the phase's bandwidth limit beside the rate", () => {
    expect(progressLine({ ...base, limitBytesPerSec: 64 * 2 ** 20 })).toBe('precopy round 2 (wp-async)  sent 3.0 GiB  64.0 MiB/s (limit 64.0 MiB/s)  pages left 1 (99.9% local)')
    expect(progressLine({ ...base, phase: SourcePhase.RECOVERING, brokenBy: 'the destination looks stuck: nothing arrived from it for 2000 ms' }))
      .toBe('recovering  sent 3.0 GiB  64.0 MiB/s  pages left 1 (99.9% local)  (the destination looks stuck: nothing arrived from it for 2000 ms)')
  })

  it('recovering before the destination confirmed the hand-off: the line says that where the service runs is being asked', () => {
    const recovering = { ...base, phase: SourcePhase.RECOVERING, brokenBy: 'connection reset by peer' }
    expect(progressLine({ ...recovering, serviceRunsOn: 'unknown' })).toBe('recovering  sent 3.0 GiB  64.0 MiB/s  pages left 1 (99.9% local)  (connection reset by peer; the hand-off is not confirmed yet: asking the destination whether the service runs there)')
    expect(progressLine({ ...recovering, serviceRunsOn: 'destination' })).toBe('recovering  sent 3.0 GiB  64.0 MiB/s  pages left 1 (99.9% local)  (connection reset by peer)')
    // (post-copy before RESUMED is a few milliseconds: not worth a word)
    expect(progressLine({ ...base, phase: SourcePhase.POSTCOPY, serviceRunsOn: 'unknown' })).toBe('postcopy  sent 3.0 GiB  64.0 MiB/s  pages left 1 (99.9% local)')
  })
})

describe('report', () => {
  const report = {
    mode: 'precopy', to: 'h:7070', regions: [{ name: 'heap', sizeBytes: 32 << 20 }], pageSize: 4096, totalMs: 3000, downtimeMs: 9, pauseWaitMs: 0.2,
    clockOffsetMs: 0, clockRttMs: 0.1, bytesOnWire: 40 << 20, pages: { data: 8000, zero: 192, free: 0 }, pagesResent: 900, pagesSentTwiceAfterHandoff: 0,
    rounds: [0, 1, 2].map((round) => ({ round, dataPages: 1, zeroPages: 0, freePages: 0, hotPages: 0, bytes: 4096, durationMs: 1 })),
    precopyStop: 'converged', discardedPages: 0, pagesMissingAtHandoff: 0,
    postcopy: { strategy: 'none', demandPath: 'native', networkFaults: 0, networkFaultsOnZeroPages: 0, localZeroFaults: 0, faultLatencyUs: { p50: 0, p99: 0 }, pushedPages: 0, demandPages: 0, timeToSettledMs: 0 },
  } as unknown as MigrationReport
  const preCopyLine = (r: MigrationReport) => formatReport(r).split('\n').find((l) => l.startsWith('  pre-copy'))

  it('why pre-copy stopped, and the rate the convergence check went by', () => {
    expect(preCopyLine(report)).toBe('  pre-copy           3 round(s), stopped: converged')
    expect(preCopyLine({ ...report, convergenceRate: { bytesPerSec: 2 ** 30, from: 'switchover-bandwidth' } })).toBe(
      '  pre-copy           3 round(s), stopped: converged (against 1.0 GiB/s, the switchover bandwidth given)',
    )
    expect(preCopyLine({ ...report, precopyStop: 'round-limit', convergenceRate: { bytesPerSec: 16 * 2 ** 20, from: 'measured' } })).toBe(
      '  pre-copy           3 round(s), stopped: round-limit (against 16.0 MiB/s, the rate the rounds measured)',
    )
  })

  it('a report written by a new agent says so', () => {
    const lines = formatReport({ ...report, takeover: { crashedInPhase: 'postcopy', message: 'boom' } }).split('\n')
    expect(lines.filter((l) => l.startsWith('  agent takeover'))).toEqual([
      "  agent takeover     the migration agent crashed in phase postcopy (boom); a new one took the migration over (the rounds and the pause window's figures went with the old one)",
    ])
    expect(formatReport(report)).not.toMatch(/agent takeover/)
  })

  it('recoveries after a malformed frame are named apart from broken links', () => {
    const postcopyLine = (r: MigrationReport) => formatReport(r).split('\n').find((l) => / fault latency /.test(l))
    const mode = { ...report, mode: 'postcopy' } as MigrationReport
    expect(postcopyLine({ ...mode, postcopy: { ...report.postcopy, recoveries: 3, protocolBreaks: 1 } })).toMatch(/; link recovered 3x \(1 after a malformed frame\)$/)
    expect(postcopyLine({ ...mode, postcopy: { ...report.postcopy, recoveries: 2, protocolBreaks: 0 } })).toMatch(/; link recovered 2x$/)
  })
})

describe('a guest that moved away (status and list)', () => {
  const forwarding = { open: 3, held: 0, connections: 5, requests: 2, bytes: 3 << 20, idleMs: 40 }

  it('where it moved, what its forwarder does, and when this process exits', () => {
    expect(movedLines({ to: 'b:7070', forwarding, exitsAfterIdleMs: 2000 })).toEqual([
      'moved to b:7070: the service runs there now',
      "forwarding this address's clients there: 3 open connection(s); so far 5 connection(s) relayed and 2 request(s) proxied, 3.0 MiB through those that ended",
      'this process exits once no client connection is open and none came for 2000 ms (clients use it now)',
    ])
    expect(movedLines({ to: 'b:7070', forwarding: { ...forwarding, open: 0, held: 1 }, exitsAfterIdleMs: 2000 })[1]).toContain('0 open connection(s) and 1 held;')
    expect(movedLines({ to: 'b:7070', forwarding: { ...forwarding, open: 0 }, exitsAfterIdleMs: 2000 })[2]).toMatch(/ \(idle for 40 ms\)$/)
  })

  it("a process the service keeps says so; one that does not serve() has no forwarder line", () => {
    expect(movedLines({ to: 'b:7070' })).toEqual(['moved to b:7070: the service runs there now', "this process runs on: the service keeps it (a 'moved' listener, or exitOnMoved false)"])
    expect(movedSummary({ to: 'b:7070', forwarding, exitsAfterIdleMs: 2000 })).toBe('to b:7070, forwarding 3 connection(s)')
    expect(movedSummary({ to: 'b:7070' })).toBe('to b:7070')
  })
})

describe('send --dry-run', () => {
  const dry: PreflightReport = {
    to: '10.0.0.2:7070', migration: 'a1b2c3', mode: 'hybrid', connectMs: 1.25, totalMs: 3.5, regions: [{ name: 'heap', sizeBytes: 64 * 2 ** 20 }],
    residentBytes: 2 ** 20, tracker: { kind: 'wp-async', reason: 'WP_ASYNC and PAGEMAP_SCAN' }, encrypted: false,
    destination: { headroomBytes: 2 ** 30, limitedBy: 'MemAvailable', streams: 1 },
  }
  const line = (r: PreflightReport, name: string) => formatPreflight(r).split('\n').find((l) => l.startsWith(`  ${name} `))

  it('says whether the connections would be sealed, and how to ask', () => {
    expect(line(dry, 'encryption')).toBe('  encryption         off (the link is authenticated, not encrypted: --encrypt)')
    expect(line({ ...dry, encrypted: true }, 'encryption')).toBe('  encryption         on: every connection sealed (AES-256-GCM over X25519)')
    expect(line(dry, 'migration id')).toMatch(/a1b2c3 \(the destination logged its preflight line with it\)/)
  })
})
