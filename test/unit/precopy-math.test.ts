/** Hot pages (Ma et al.) and convergence, as pure functions. */
import { describe, expect, it } from 'vitest'
import { converged, convergenceRate, linkRate, splitHot, type ConvergenceState } from '../../src/agent/source/precopy'
import { discardRuns, heldRuns, sendWrittenInWindow, WINDOW_SEND_MS } from '../../src/agent/source/handoff'
import { PageBitmap } from '../../src/bitmap'

const map = (size: number, pages: number[]) => {
  const m = new PageBitmap(size)
  for (const p of pages) m.set(p)
  return m
}
const pagesOf = (m: PageBitmap) => [...Array(m.size).keys()].filter((p) => m.has(p))

describe('splitHot', () => {
  it('round 0 sends everything written and remembers nothing as written before', () => {
    const prev = new PageBitmap(100), hot = new PageBitmap(100)
    const send = splitHot(map(100, [1, 2, 70]), prev, hot, 0)
    expect(pagesOf(send)).toEqual([1, 2, 70])
    expect(pagesOf(hot)).toEqual([])
    expect(pagesOf(prev)).toEqual([])
  })

  it('a page written in two consecutive rounds turns hot and waits; it goes once it cooled', () => {
    const prev = new PageBitmap(100), hot = new PageBitmap(100)
    splitHot(map(100, [5]), prev, hot, 0)
    expect(pagesOf(splitHot(map(100, [5, 6]), prev, hot, 1))).toEqual([5, 6]) // round 0 does not count
    expect(pagesOf(splitHot(map(100, [5, 7]), prev, hot, 2))).toEqual([7]) // 5 again: hot
    expect(pagesOf(hot)).toEqual([5])
    expect(pagesOf(splitHot(map(100, [5]), prev, hot, 3))).toEqual([]) // still hot
    expect(pagesOf(splitHot(map(100, [40]), prev, hot, 4))).toEqual([5, 40]) // 5 cooled: it goes
    expect(pagesOf(hot)).toEqual([])
  })

  it('works across word boundaries (33 pages, bits 31 and 32)', () => {
    const prev = new PageBitmap(33), hot = new PageBitmap(33)
    splitHot(map(33, [31, 32]), prev, hot, 0)
    splitHot(map(33, [31, 32]), prev, hot, 1)
    expect(pagesOf(splitHot(map(33, [31, 32]), prev, hot, 2))).toEqual([])
    expect(pagesOf(hot)).toEqual([31, 32])
  })
})

describe('converged', () => {
  const fresh = (): ConvergenceState => ({ prevRemaining: Infinity, notShrinking: 0 })
  it('stops when the rest fits the downtime budget at the measured rate', () => {
    // 1000 pages of 4 KiB at 100 KiB/ms: 40 ms
    expect(converged(fresh(), 1, 1000, 4096, 100 * 1024, 50, 5)).toBe('converged')
    expect(converged(fresh(), 1, 1000, 4096, 100 * 1024, 30, 5)).toBeUndefined()
  })

  it('stops after two rounds that did not shrink the rest by 10 %', () => {
    const s = fresh()
    expect(converged(s, 1, 10_000, 4096, 1024, 1, 99)).toBeUndefined()
    expect(converged(s, 2, 9_500, 4096, 1024, 1, 99)).toBeUndefined() // -5 %: one
    expect(converged(s, 3, 9_400, 4096, 1024, 1, 99)).toBe('not-converging') // two
  })

  it('a shrinking round resets the count; the round limit ends it', () => {
    const s = fresh()
    converged(s, 1, 10_000, 4096, 1024, 1, 4)
    converged(s, 2, 9_900, 4096, 1024, 1, 4)
    expect(converged(s, 3, 5_000, 4096, 1024, 1, 4)).toBeUndefined()
    expect(s.notShrinking).toBe(0)
    expect(converged(s, 4, 2_000, 4096, 1024, 1, 4)).toBe('round-limit')
  })

  it('linkRate: the best round of at least 4 MiB, 100 MB/s until measured', () => {
    const r = (bytes: number, durationMs: number) => ({ round: 0, dataPages: 0, zeroPages: 0, freePages: 0, hotPages: 0, bytes, durationMs })
    expect(linkRate([])).toBe(100 * 1024)
    expect(linkRate([r(1 << 20, 1)])).toBe(100 * 1024) // too small to measure
    expect(linkRate([r(8 << 20, 10), r(8 << 20, 4)])).toBe((8 << 20) / 4)
    // a slow link is what was measured, not the default
    expect(linkRate([r(1 << 20, 1), r(16 << 20, 1000)])).toBe((16 << 20) / 1000)
  })

  it('convergenceRate: the switchover bandwidth when given (rounds held to a limit measure the limit), else measured', () => {
    const r = (bytes: number, durationMs: number) => ({ round: 0, dataPages: 0, zeroPages: 0, freePages: 0, hotPages: 0, bytes, durationMs })
    const limited = [r(16 << 20, 1000)] // 16 MiB/s
    expect(convergenceRate(limited, undefined)).toEqual({ bytesPerSec: 16 << 20, from: 'measured' })
    expect(convergenceRate(limited, 0)).toEqual({ bytesPerSec: 16 << 20, from: 'measured' })
    expect(convergenceRate(limited, 1 << 30)).toEqual({ bytesPerSec: 1 << 30, from: 'switchover-bandwidth' })
    // 3000 pages left, 50 ms budget: not at the limited rate (750 ms), yes at 1 GiB/s (11.4 ms)
    const check = (bytesPerSec: number) => converged({ prevRemaining: Infinity, notShrinking: 0 }, 1, 3000, 4096, bytesPerSec / 1000, 50, 5)
    expect(check(convergenceRate(limited, undefined).bytesPerSec)).toBeUndefined()
    expect(check(convergenceRate(limited, 1 << 30).bytesPerSec)).toBe('converged')
  })
})

describe('discard list', () => {
  it('is stale ∩ destHas over run lists that may overlap, and those pages leave destHas', () => {
    const has = map(40, [1, 2, 3, 33, 36])
    // written since the last round, then the hot pages (36 in both)
    const runs = discardRuns(has, [[2, 3, 33, 2, 36, 1], undefined, [35, 2]])
    expect(Array.from(runs)).toEqual([2, 2, 33, 1, 36, 1])
    expect(pagesOf(has)).toEqual([1])
  })
})

describe('hybrid: written pages sent in the window or dropped', () => {
  it('takes the written pages the destination holds, leaving destHas as it is', () => {
    const has = map(40, [1, 2, 3, 33, 36])
    const { runs, pages } = heldRuns(has, [2, 3, 30, 5, 39, 1])
    expect(runs).toEqual([[2, 2], [33, 1]])
    expect(pages).toBe(3)
    expect(pagesOf(has)).toEqual([1, 2, 3, 33, 36])
  })

  it('sends them when their transfer at the measured rate fits the window budget, else drops them', () => {
    const ps = 4096, gbps = 1024 ** 3 / 1000 // 1 GiB/s in bytes per ms
    const fit = Math.floor((WINDOW_SEND_MS * gbps) / ps) // 524 pages of 4 KiB in 2 ms at 1 GiB/s
    expect(sendWrittenInWindow(fit, ps, gbps)).toBe(true)
    expect(sendWrittenInWindow(fit + 1, ps, gbps)).toBe(false)
    expect(sendWrittenInWindow(0, ps, gbps)).toBe(false) // nothing to send: no final round
    // before a round measured the link, linkRate() says 100 MiB/s: a tenth as many
    expect(sendWrittenInWindow(60, ps, 100 * 1024)).toBe(false)
    expect(sendWrittenInWindow(50, ps, 100 * 1024)).toBe(true)
  })
})
