/** Units on the push policies, against pending bitmaps (pure TypeScript). */
import { describe, expect, it } from 'vitest'
import { PageBitmap } from '../../src/bitmap'
import { BUBBLE_DEFAULTS, BubblingPush } from '../../src/agent/bubbling'
import type { PushRun } from '../../src/agent/push-policy'
import { createPushPolicy } from '../../src/agent/prepaging'
import { modelFaults } from '../../src/agent/policy-model'
// eslint-disable-next-line @typescript-eslint/no-require-imports
const { touchOrder } = require('../../examples/scan-service/order.js') as { touchOrder: (ws: number, first: number, pattern: string) => Uint32Array }

function allPending(size: number): PageBitmap {
  const m = new PageBitmap(size)
  m.setRange(0, size)
  return m
}

/** What the source does with a batch: send the pages still pending, clear them. */
function send(pending: PageBitmap[], runs: PushRun[]): number[] {
  const sent: number[] = []
  for (const r of runs) {
    for (let p = r.firstPage; p < r.firstPage + r.pageCount; p++) {
      if (pending[r.region].has(p)) {
        pending[r.region].clear(p)
        sent.push(p)
      }
    }
  }
  return sent
}

const flat = (runs: PushRun[]) => runs.flatMap((r) => Array.from({ length: r.pageCount }, (_, i) => r.firstPage + i))

describe('bubbling prepaging', () => {
  it('bubbles forward and (less) backward around one pivot', () => {
    const pending = [allPending(1000)]
    const policy = new BubblingPush(pending, { ...BUBBLE_DEFAULTS, pivots: 1, adaptive: false })
    policy.onFault(0, 500)
    const batch = policy.next(16)
    expect(flat(batch)).toEqual([501, 502, 503, 504, 505, 506, 507, 508, 509, 510, 511, 512, 496, 497, 498, 499])
    send(pending, batch)
    expect(flat(policy.next(16)).slice(0, 3)).toEqual([513, 514, 515])
  })

  it('stops an edge at a page already sent, then falls back to the sticky pivot', () => {
    const pending = [allPending(100)]
    pending[0].clear(53) // already sent
    pending[0].clear(48)
    const policy = new BubblingPush(pending, { ...BUBBLE_DEFAULTS, pivots: 1, adaptive: false, initialWindow: 64 })
    policy.onFault(0, 50)
    const pages = flat(policy.next(64))
    // forward 51, 52 then 53 is sent: edge stops; backward 49 then 48 is sent: stops; the rest comes from page 0 on
    expect(pages.slice(0, 3)).toEqual([51, 52, 49])
    expect(policy.pivotState).toHaveLength(0)
    expect(pages.slice(3, 6)).toEqual([0, 1, 2])
  })

  it('fills the holes of the area that faulted last before the sticky pivot walks on', () => {
    // Random faults leave bubbles that stopped at each other: every 4th page is still missing.
    const pending = [new PageBitmap(4096)]
    for (let p = 0; p < 4096; p += 4) pending[0].set(p)
    const policy = new BubblingPush(pending, { ...BUBBLE_DEFAULTS, pivots: 7, areaPages: 512 })
    pending[0].clear(2000) // the faulted page goes on the urgent channel
    policy.onFault(0, 2000)
    const first = policy.next(64)
    const pages = flat(first).filter((p) => pending[0].has(p))
    // neighbours 2001..2003 and 1999 are sent: both edges stop at once; then the
    // holes of area [1536, 2048) in order, not page 0 of the sticky walk
    expect(policy.pivotState).toHaveLength(0)
    expect(pages.slice(0, 4)).toEqual([1536, 1540, 1544, 1548])
    expect(pages.every((p) => p >= 1536 && p < 2048)).toBe(true)
    send(pending, first)
    const rest = send(pending, policy.next(63))
    expect(rest.every((p) => p >= 1536 && p < 2048)).toBe(true)
    // the area's 127 holes (all but the faulted page) are gone: the sticky pivot goes on from page 0
    expect(pending[0].nextSet(1536, 2048)).toBe(-1)
    expect(send(pending, policy.next(4))[0]).toBe(0)
  })

  it('shares the push among several pivots, most recent first', () => {
    const pending = [allPending(10_000)]
    const policy = new BubblingPush(pending, { ...BUBBLE_DEFAULTS, pivots: 7, adaptive: false, initialWindow: 8, backwardRatio: 1e9 })
    policy.onFault(0, 1000)
    policy.onFault(0, 5000)
    expect(flat(policy.next(16))).toEqual([5001, 5002, 5003, 5004, 5005, 5006, 5007, 5008, 1001, 1002, 1003, 1004, 1005, 1006, 1007, 1008])
  })

  it('keeps only the k most recent pivots', () => {
    const pending = [allPending(100_000)]
    const policy = new BubblingPush(pending, { ...BUBBLE_DEFAULTS, pivots: 7 })
    for (let i = 0; i < 12; i++) policy.onFault(0, i * 5000)
    expect(policy.pivotState.map((p) => p.center)).toEqual([55000, 50000, 45000, 40000, 35000, 30000, 25000])
  })

  it('grows the window of a pivot whose neighbourhood keeps faulting, and resets it when faults go elsewhere', () => {
    const pending = [allPending(100_000)]
    const policy = new BubblingPush(pending, { ...BUBBLE_DEFAULTS, pivots: 7, initialWindow: 16 })
    policy.onFault(0, 100)
    send(pending, policy.next(16))
    policy.onFault(0, 113) // next to the bubble: a hit
    policy.onFault(0, 140)
    expect(policy.pivotState).toHaveLength(1)
    expect(policy.pivotState[0].window).toBe(64)
    for (let i = 1; i <= 7; i++) policy.onFault(0, 50_000 + i * 1000)
    const first = policy.pivotState.find((p) => p.center === 100)
    expect(first).toBeUndefined() // pushed out by 7 newer pivots
    expect(policy.pivotState[6].window).toBe(16)
  })

  it('counts only faults next to a moving edge as hits, and skips ahead only over pages already taken', () => {
    const pending = [allPending(100_000)]
    const policy = new BubblingPush(pending, { ...BUBBLE_DEFAULTS, pivots: 7, initialWindow: 16, backwardRatio: 1e9 })
    policy.onFault(0, 1000)
    for (let i = 0; i < 5; i++) send(pending, policy.next(16)) // 1001..1080 sent: forward edge at 1081
    // a fault far behind the edges (a page of the bubble) is no hit: a new pivot starts there
    policy.onFault(0, 1040)
    expect(policy.pivotState.map((p) => p.center)).toEqual([1040, 1000])
    expect(policy.pivotState[1].window).toBe(16)
    // a fault just ahead of the forward edge with pages still pending in between: a hit, no skip
    policy.onFault(0, 1090)
    const old = policy.pivotState.find((p) => p.center === 1000)!
    expect(old.window).toBe(32)
    expect(old.fwd).toBe(1081)
    // the service took every page up to its fault (a sequential scan ahead of the push): the edge follows it
    for (let p = 1081; p < 1100; p++) pending[0].clear(p)
    policy.onFault(0, 1100)
    expect(policy.pivotState.find((p) => p.center === 1000)!.fwd).toBe(1101)
  })

  it('follows a service that overtook the push: late faults restart the stopped edge, which then jumps over the pages the service took', () => {
    const pending = [allPending(10_000)]
    const policy = new BubblingPush(pending, { ...BUBBLE_DEFAULTS, pivots: 7, initialWindow: 64, backwardRatio: 1e9, areaPages: 0 })
    policy.onFault(0, 1000)
    pending[0].clear(1000)
    // a sequential scan fetches 1001..1040 on demand before the policy hears of those faults (they come in batches)
    for (let p = 1001; p <= 1040; p++) pending[0].clear(p)
    // Hines' rule: the forward edge stops at the first page already sent
    expect(flat(policy.next(64))).not.toContain(1041)
    expect(policy.pivotState[0].fwd).toBe(-1)
    // the faults arrive: the service took every page from the stop to them, so the edge goes on past them
    for (let p = 1001; p <= 1040; p++) policy.onFault(0, p)
    expect(policy.pivotState).toHaveLength(1) // no stale pivot per late fault
    expect(policy.pivotState[0].fwd).toBe(1041)
    // before the next turn the scan took 1041..1060 too: the edge jumps over them instead of stopping again
    for (let p = 1041; p <= 1060; p++) pending[0].clear(p)
    expect(flat(policy.next(64)).slice(0, 3)).toEqual([1061, 1062, 1063])
    // a gap wider than the window is another bubble's: the edge stops there as before
    const w = policy.pivotState[0].window
    const fwd = policy.pivotState[0].fwd
    pending[0].clearRange(fwd, w + 1)
    expect(flat(policy.next(64)).filter((p) => p > fwd)).toEqual([])
    expect(policy.pivotState.find((p) => p.center === 1000)?.fwd ?? -1).toBe(-1)
  })

  it('puts a hinted range at the front of the push', () => {
    const pending = [allPending(1000)]
    const policy = new BubblingPush(pending)
    policy.onFault(0, 10)
    policy.onHint(0, 800, 40)
    expect(flat(policy.next(40))).toEqual(Array.from({ length: 40 }, (_, i) => 800 + i))
  })

  it('sends every page exactly once under random faults, in every strategy, and always makes progress', () => {
    for (const strategy of ['bubble', 'bubble1', 'push'] as const) {
      const pending = [allPending(3000), allPending(1234)]
      const policy = createPushPolicy({ strategy }, pending)
      const seen = [new Uint8Array(3000), new Uint8Array(1234)]
      let seed = 99
      let batches = 0
      while (pending[0].count() + pending[1].count() > 0) {
        seed = (seed * 1103515245 + 12345) >>> 0
        if (seed % 3 === 0) policy.onFault(seed % 2, seed % (seed % 2 ? 1234 : 3000))
        const runs = policy.next(64)
        expect(runs.length).toBeGreaterThan(0)
        for (const r of runs) {
          for (let p = r.firstPage; p < r.firstPage + r.pageCount; p++) {
            if (pending[r.region].has(p)) {
              expect(seen[r.region][p]).toBe(0)
              seen[r.region][p] = 1
              pending[r.region].clear(p)
            }
          }
        }
        expect(++batches).toBeLessThan(2000)
      }
      expect(seen[0].every((v) => v === 1) && seen[1].every((v) => v === 1)).toBe(true)
    }
  })

  it('stays next to the best possible push on random working sets (the model of bench:postcopy, table A0)', async () => {
    // the real policies on the scan-service's own touch order, without a network
    const o = { guestPages: 262144, wsPages: 32768, firstPage: 81920, order: touchOrder(32768, 81920, 'random') }
    const [push, bubble, oracle] = (['push', 'bubble', 'oracle'] as const).map((strategy) => modelFaults({ ...o, strategy }))
    expect(oracle).toBeLessThan(push)
    expect(bubble).toBeLessThanOrEqual(oracle * 1.1) // an oracle pushes exactly the working set
    expect(bubble / push).toBeLessThan(0.35)
  })

  it('keeps ahead of a sequential scan whose faults it hears late (the model of table A0, faults heard in batches)', () => {
    // the agent hears of faults every millisecond: a scan faulting page after page is ~16 faults ahead of what
    // the policy knows; stopping the forward edge at the pages it took left the push going backwards (63 %)
    for (const ws of [2048, 32768]) {
      const o = { guestPages: 262144, wsPages: ws, firstPage: 81920, order: touchOrder(ws, 81920, 'sequential'), faultReportLag: 16 }
      expect(modelFaults({ ...o, strategy: 'bubble' })).toBeLessThan(5)
    }
  })

  it('demand-only pushes nothing while faults are recent', () => {
    const pending = [allPending(100)]
    const policy = createPushPolicy({ strategy: 'demand', idleFillMs: 60_000 }, pending)
    policy.onFault(0, 5)
    expect(policy.next(64)).toEqual([])
    const idle = createPushPolicy({ strategy: 'demand', idleFillMs: 0 }, pending)
    expect(flat(idle.next(4))).toEqual([0, 1, 2, 3])
  })

  it('rejects an unknown strategy with a clear error', () => {
    expect(() => createPushPolicy({ strategy: 'zigzag' as never }, [])).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG', message: expect.stringMatching(/bubble, bubble1, push, demand/) }))
  })
})
