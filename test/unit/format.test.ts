/** The CLI's progress line and report lines (src/cli/format.ts). */
import { describe, expect, it } from 'vitest'
import { progressLine } from '../../src/cli/format'
import { SourcePhase } from '../../src/agent/source/machine'

const base = { phase: SourcePhase.PRECOPY, round: 2, bytesSent: 3 * 2 ** 30, bytesPerSec: 64 * 2 ** 20, pagesLeft: 1, totalPages: 1000, tracker: 'wp-async' as const }

describe('progress line', () => {
  it('the round, the tracker, the rate and what is left; a page left is never 100.0% local', () => {
    expect(progressLine(base)).toBe('precopy round 2 (wp-async)  sent 3.0 GiB  64.0 MiB/s  pages left 1 (99.9% local)')
    expect(progressLine({ ...base, phase: SourcePhase.POSTCOPY, pagesLeft: 0 })).toBe('postcopy  sent 3.0 GiB  64.0 MiB/s  pages left 0 (100.0% local)')
  })

  it("the phase's bandwidth limit beside the rate", () => {
    expect(progressLine({ ...base, limitBytesPerSec: 64 * 2 ** 20 })).toBe('precopy round 2 (wp-async)  sent 3.0 GiB  64.0 MiB/s (limit 64.0 MiB/s)  pages left 1 (99.9% local)')
  })
})
