/**
 * Post-copy recovery after a break in each post-copy state, in memory: the
 * link is cut at a chosen frame (a reset: what was in flight is lost); the
 * source dials again, learns what arrived, and the migration settles with
 * every byte equal and no page received twice.
 */
import { describe, expect, it } from 'vitest'
import { Msg } from '../../src/protocol/messages'
import type { FakeBinding } from '../../src/testing/fake-binding'
import type { Region } from '../../src/region'
import { makePair, pageBytes, sameBytes, startSource, touchAll } from './helpers/wire'

function fill(src: FakeBinding, regions: Region[]): void {
  regions.forEach((r, i) => {
    for (let p = 0; p < r.pageCount; p++) if (p % 3 !== 2) src.write(r.id, p * 4096, pageBytes(i, p, 0))
  })
}

type Side = 'source' | 'destination'
const cases: { name: string; side: Side; type: Msg; nth: number; destRecovers: boolean }[] = [
  { name: 'as HANDOFF arrives, before RESUMED', side: 'destination', type: Msg.RESUMED, nth: 1, destRecovers: true },
  { name: 'in the middle of the push', side: 'source', type: Msg.PAGES, nth: 6, destRecovers: true },
  { name: 'with a page request open', side: 'destination', type: Msg.PAGE_REQUEST, nth: 2, destRecovers: true },
  { name: 'with a reply half-way', side: 'source', type: Msg.REQUEST_DONE, nth: 1, destRecovers: true },
  { name: 'as SETTLED leaves the destination', side: 'destination', type: Msg.SETTLED, nth: 1, destRecovers: false },
]

describe('post-copy recovery after a break', () => {
  for (const c of cases) {
    it(c.name, async () => {
      const pair = makePair([200, 60], fill)
      let seen = 0, cut = false
      pair.onFrame = (from, type) => {
        // after the destination restored the service (a break that loses HANDOFF itself is not post-copy)
        if (cut || !pair.events.includes('restore') || from !== c.side || type !== c.type || ++seen < c.nth) return undefined
        cut = true
        return 'cut'
      }
      const { report } = startSource(pair, { mode: 'postcopy', extra: { prepaging: { strategy: 'push' } } })
      await pair.restored
      await touchAll(pair, 'random', 5)
      const rep = await report
      await pair.settled
      expect(cut).toBe(true)
      expect(rep.postcopy.recoveries).toBe(1)
      expect(pair.events.includes('recovering')).toBe(c.destRecovers)
      expect(pair.links.length).toBe(4) // two pairs: the broken one and the one that recovered
      expect(sameBytes(pair)).toBeUndefined()
      expect(rep.pagesSentTwiceAfterHandoff).toBe(0)
      expect(rep.downtimeMs).toBeGreaterThanOrEqual(0)
      // the destination's report crossed: its figures are there, not defaults
      expect(rep.postcopy.faultLatencyUs.count).toBeGreaterThan(0)
      expect(rep.postcopy.pagesLocalAtDestination).toBe(260)
    })
  }

  it('a source that cannot dial again within recoveryTimeoutMs fails, and keeps its memory', async () => {
    const pair = makePair([100], fill)
    pair.onFrame = (from, type) => {
      if (pair.events.includes('restore') && !pair.refuseDials && from === 'source' && type === Msg.PAGES) {
        pair.refuseDials = true
        return 'cut'
      }
      return undefined
    }
    const { report } = startSource(pair, { mode: 'postcopy', extra: { recoveryTimeoutMs: 300 } })
    await pair.restored
    await expect(report).rejects.toMatchObject({ code: 'ERR_MIGRATION_CONNECTION', message: expect.stringMatching(/keeps its memory/) })
    expect(pair.resumedOnSource).toBe(0) // the service runs on the destination: never twice
    expect(new Uint8Array(pair.srcRegions[0].buffer)[0]).toBe(0) // region 0 page 0: pageBytes(0, 0, 0) starts with u32 0
    expect(new DataView(pair.srcRegions[0].buffer).getUint32(12)).toBe(0xfeed)
  })
})
