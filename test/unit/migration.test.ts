/**
 * Whole migrations between a source and a destination engine wired in
 * memory (fake binding, in-memory transports): each mode, the service writing
 * between rounds, every byte compared. No addon, no socket, no kernel.
 */
import { describe, expect, it } from 'vitest'
import { makePair, pageBytes, prng, sameBytes, startSource, touchAll } from './helpers/wire'
import type { FakeBinding } from '../../src/testing/fake-binding'
import type { Region } from '../../src/region'
import { nowMs } from '../../src/stats'

/** Half the pages hold data, some hold zeros written explicitly, the rest were never touched. */
function fill(src: FakeBinding, regions: Region[]): void {
  regions.forEach((r, i) => {
    for (let p = 0; p < r.pageCount; p++) {
      if (p % 2 === 0) src.write(r.id, p * 4096, pageBytes(i, p, 0))
      else if (p % 7 === 0) src.write(r.id, p * 4096, new Uint8Array(4096))
    }
  })
}

function writer(seed: number) {
  const rand = prng(seed)
  let version = 1
  return (src: FakeBinding, regions: Region[]) => {
    // a hot set (pages 0..15 of region 0, every time) and random pages
    const r0 = regions[0]
    for (let p = 0; p < 16; p++) src.write(r0.id, p * 4096, pageBytes(0, p, version))
    for (let k = 0; k < 8; k++) {
      const i = Math.floor(rand() * regions.length), r = regions[i]
      const p = Math.floor(rand() * r.pageCount)
      src.write(r.id, p * 4096, pageBytes(i, p, version))
    }
    version++
  }
}

describe('a whole migration in memory', () => {
  for (const mode of ['precopy', 'hybrid', 'postcopy'] as const) {
    it(`${mode}: every byte arrives, each page at most once after the hand-off`, async () => {
      const pair = makePair([300, 77], fill)
      // a budget too small to converge: rounds run until they stop shrinking or hit the limit
      const { report } = startSource(pair, { mode, writer: writer(7), state: new Uint8Array([9, 8, 7]), extra: { downtimeMs: 0.001 } })
      const state = await pair.restored
      expect(Array.from(state)).toEqual([9, 8, 7])
      await touchAll(pair, 'random', 3)
      const rep = await report
      await pair.settled
      expect(sameBytes(pair)).toBeUndefined()
      expect(rep.mode).toBe(mode)
      expect(rep.pagesSentTwiceAfterHandoff).toBe(0)
      expect(pair.dest.phase).toBe('settled')
      expect(pair.resumedOnSource).toBe(0)
      if (mode === 'postcopy') {
        expect(rep.rounds).toHaveLength(1)
        expect(rep.rounds[0].dataPages).toBe(0)
        expect(rep.precopyStop).toBe('postcopy')
      } else {
        expect(rep.rounds.length).toBeGreaterThanOrEqual(3)
        expect(['not-converging', 'round-limit']).toContain(rep.precopyStop)
        expect(rep.rounds[0].dataPages).toBeGreaterThan(0)
        // the hot set waited for the hand-off instead of going every round
        expect(rep.rounds.slice(1).some((r) => r.hotPages >= 16)).toBe(true)
      }
      if (mode === 'precopy') expect(rep.discardedPages).toBe(0)
      expect(rep.pages.zero).toBeGreaterThan(0)
    })
  }

  it('free pages reported by the service never carry data', async () => {
    const pair = makePair([64], fill)
    let reported = false
    const { report } = startSource(pair, {
      mode: 'hybrid',
      freed: () => {
        if (reported) return []
        reported = true
        pair.src.discard(pair.srcRegions[0].id, 0, 8 * 4096)
        return [0, 0, 8]
      },
    })
    await pair.restored
    await touchAll(pair)
    const rep = await report
    expect(rep.pages.free).toBeGreaterThanOrEqual(8)
    expect(sameBytes(pair)).toBeUndefined()
  })

  it('the downtime starts when the service stopped, not when the pause was asked for', async () => {
    const pair = makePair([64], fill)
    const { source, report } = startSource(pair, { mode: 'hybrid' })
    // a service whose event loop gets to the request 40 ms late, then stops
    const hooks = (source as unknown as { hooks: { pause(): Promise<{ state: Uint8Array; stoppedAtMs?: number }> } }).hooks
    hooks.pause = async () => {
      await new Promise((r) => setTimeout(r, 40))
      return { state: new Uint8Array([5]), stoppedAtMs: nowMs() }
    }
    await pair.restored
    await touchAll(pair)
    const rep = await report
    expect(rep.pauseWaitMs).toBeGreaterThanOrEqual(39)
    const b = rep.downtimeBreakdownMs!
    // the parts still sum to the downtime, and the wait is in none of them
    expect(b.pause + b.finalScan + b.handoffTransfer + b.discard + b.restore).toBeCloseTo(rep.downtimeMs, 6)
    expect(b.pause).toBeLessThan(rep.pauseWaitMs)
    expect(b.pause).toBeGreaterThanOrEqual(0)
  })
})
