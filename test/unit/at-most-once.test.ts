/**
 * Invariant 2 (each page travels at most once after the hand-off) and 1 (no
 * lost update) as a property: random interleavings of the service's faults
 * (touch order, timing), push policies, writes between rounds and link
 * breaks at random frames, from a seeded generator (fast-check).
 */
import fc from 'fast-check'
import { describe, expect, it } from 'vitest'
import { Msg } from '../../src/protocol/messages'
import type { FakeBinding } from '../../src/testing/fake-binding'
import type { Region } from '../../src/region'
import { makePair, pageBytes, prng, sameBytes, startSource } from './helpers/wire'

const BREAKABLE = [
  ['source', Msg.PAGES], ['source', Msg.RANGES], ['source', Msg.REQUEST_DONE],
  ['destination', Msg.PAGE_REQUEST], ['destination', Msg.RESUMED], ['destination', Msg.WILL_NEED],
] as const

describe('each page at most once after the hand-off', () => {
  it('holds over random faults, pushes and breaks', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.record({
          seed: fc.integer({ min: 1, max: 1 << 30 }),
          mode: fc.constantFrom('postcopy' as const, 'hybrid' as const),
          strategy: fc.constantFrom('bubble' as const, 'bubble1' as const, 'push' as const, 'demand' as const),
          breaks: fc.array(fc.record({ at: fc.constantFrom(...BREAKABLE), nth: fc.integer({ min: 1, max: 12 }) }), { maxLength: 2 }),
          touchBatch: fc.integer({ min: 1, max: 40 }),
        }),
        async ({ seed, mode, strategy, breaks, touchBatch }) => {
          const rand = prng(seed)
          const fill = (src: FakeBinding, regions: Region[]) =>
            regions.forEach((r, i) => {
              for (let p = 0; p < r.pageCount; p++) if (rand() < 0.7) src.write(r.id, p * 4096, pageBytes(i, p, 0))
            })
          const pair = makePair([96, 40], fill)
          const counts = new Map<string, number>()
          let pending = [...breaks]
          pair.onFrame = (from, type) => {
            if (!pair.events.includes('restore')) return undefined
            const key = `${from}/${type}`
            counts.set(key, (counts.get(key) ?? 0) + 1)
            const i = pending.findIndex((b) => b.at[0] === from && b.at[1] === type && counts.get(key)! >= b.nth)
            if (i < 0) return undefined
            pending = pending.filter((_, k) => k !== i)
            return 'cut'
          }
          let version = 1
          const { report } = startSource(pair, {
            mode,
            writer: (src, regions) => {
              const i = Math.floor(rand() * regions.length), r = regions[i]
              for (let k = 0; k < 5; k++) {
                const p = Math.floor(rand() * r.pageCount)
                src.write(r.id, p * 4096, pageBytes(i, p, version++))
              }
            },
            extra: { prepaging: { strategy, idleFillMs: 20 }, downtimeMs: 0.01, recoveryTimeoutMs: 3000 },
          })
          await pair.restored
          // the service reads pages in random order, in batches, while the push runs
          const all = pair.dstRegions.flatMap((r) => [...Array(r.pageCount).keys()].map((p) => [r.id, p] as const))
          all.sort(() => rand() - 0.5)
          for (let k = 0; k < all.length; k += touchBatch) {
            await Promise.all(all.slice(k, k + touchBatch).map(([id, p]) => pair.dst.touch(id, p)))
            if (rand() < 0.3) await new Promise((r) => setImmediate(r))
          }
          const rep = await report
          await pair.settled
          expect(rep.pagesSentTwiceAfterHandoff).toBe(0)
          expect(sameBytes(pair)).toBeUndefined()
        },
      ),
      { numRuns: 40, seed: 20261125 },
    )
  }, 60_000)
})
