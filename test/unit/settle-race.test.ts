/**
 * A destination that lacks nothing at the hand-off (an idle guest, every
 * page sent in pre-copy) settles as soon as it resumes: its RESUMED and
 * SETTLED can reach the source before the source saw its own HANDOFF drain.
 * Seen in CI as a `send` that never returned (the report was dropped).
 * And a destination that ends right after it settled closes every connection
 * at once: the source may learn of a closed one before SETTLED arrives on bulk.
 * (The same for an ERROR: test/unit/last-words.test.ts.)
 */
import { describe, expect, it } from 'vitest'
import { Msg } from '../../src/protocol/messages'
import { makePair, pageBytes, sameBytes, startSource } from './helpers/wire'

describe('a destination that lacks nothing at the hand-off', () => {
  it('settles at once, and the source takes its report even when SETTLED overtakes the HANDOFF drain', async () => {
    const pair = makePair([64], (src, regions) => {
      for (let p = 0; p < 64; p += 2) src.write(regions[0].id, p * 4096, pageBytes(0, p, 0))
    })
    let release: (() => void) | undefined, releasedAfterSettled = false
    pair.onFrame = (from, type) => {
      // the source's bulk transport (the second of the pair: urgent dials first) drains only after SETTLED went
      if (from === 'source' && type === Msg.HANDOFF) release = pair.links[pair.links.length - 1].holdDrain()
      if (from === 'destination' && type === Msg.SETTLED && release) {
        setTimeout(() => {
          releasedAfterSettled = true
          release!()
        }, 20)
      }
      return undefined
    }
    const { report } = startSource(pair, { mode: 'hybrid' })
    const rep = await report
    expect(releasedAfterSettled).toBe(true)
    expect(rep.mode).toBe('hybrid')
    expect(rep.postcopy.pagesLocalAtDestination).toBe(64)
    expect(sameBytes(pair)).toBeUndefined()
  }, 10_000)

  it('ends right after SETTLED: the source takes the report arriving on bulk after another connection closed, and does not try to recover', async () => {
    const pair = makePair([64], (src, regions) => {
      for (let p = 0; p < 64; p += 2) src.write(regions[0].id, p * 4096, pageBytes(0, p, 0))
    })
    let gone = false
    pair.onFrame = (from, type) => {
      if (from !== 'destination' || type !== Msg.SETTLED || gone) return undefined
      // the destination's process exits: it takes no more connections, its urgent connection closes before SETTLED
      // (being written now) reaches the source on bulk, which then closes too
      gone = true
      pair.refuseDials = true
      const [urgent, bulk] = pair.links.slice(-2)
      bulk.pause() // SETTLED and the end of bulk reach the source 20 ms after urgent's end
      urgent.peer.destroy()
      setImmediate(() => bulk.peer.destroy()) // once SETTLED is written
      setTimeout(() => bulk.resume(), 20)
      return undefined
    }
    const { report } = startSource(pair, { mode: 'hybrid' })
    const rep = await report
    expect(gone).toBe(true)
    expect(rep.postcopy.recoveries).toBe(0)
    expect(rep.postcopy.pagesLocalAtDestination).toBe(64)
    expect(sameBytes(pair)).toBeUndefined()
  }, 10_000)
})
