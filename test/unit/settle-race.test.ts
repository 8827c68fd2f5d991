/**
 * A destination that lacks nothing at the hand-off (an idle guest, every
 * page sent in pre-copy) settles as soon as it resumes: its RESUMED and
 * SETTLED can reach the source before the source saw its own HANDOFF drain.
 * Seen in CI as a `send` that never returned (the report was dropped).
 * And a destination that ends right after it settled closes every connection
 * at once: the source may learn of a closed one before SETTLED arrives on bulk.
 * So may one that gave up after the hand-off (pages it could not place): its
 * ERROR, not a recovery, is the source's answer.
 */
import { describe, expect, it } from 'vitest'
import { installFailedError } from '../../src/agent/demand-events'
import { Msg } from '../../src/protocol/messages'
import { makePair, pageBytes, sameBytes, startSource } from './helpers/wire'

describe("the destination's last words: SETTLED or ERROR, whichever connection ends first", () => {
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

  it('gives up after the hand-off: the source takes the ERROR arriving on bulk after another connection closed, and does not dial back', async () => {
    const pair = makePair([64], (src, regions) => {
      for (let p = 0; p < 64; p++) src.write(regions[0].id, p * 4096, pageBytes(0, p, 0))
    })
    let full = false, raced = false
    pair.onFrame = (from, type) => {
      // the service runs there: from now on the destination cannot place a page (its memory cgroup is full)
      if (from === 'destination' && type === Msg.RESUMED && !full) {
        full = true
        pair.dst.install = (_id, offset, length) => {
          throw installFailedError(12, 0, offset / 4096, length / 4096)
        }
      }
      if (from !== 'destination' || type !== Msg.ERROR || raced) return undefined
      // its first ERROR is being written on bulk; its urgent connection closes before the source reads it
      raced = true
      const [urgent, bulk] = pair.links.slice(-2)
      bulk.pause()
      urgent.peer.destroy()
      setTimeout(() => bulk.resume(), 20)
      return undefined
    }
    const { source, report } = startSource(pair, { mode: 'postcopy', extra: { recoveryTimeoutMs: 5000 } })
    const err = await report.then(() => undefined, (e: Error) => e)
    expect(raced).toBe(true)
    expect(err).toMatchObject({ code: 'ERR_MIGRATION_ABORTED' })
    expect(err!.message).toMatch(/could not place \d+ page\(s\) of region 0 from page \d+: ENOMEM/)
    expect(pair.links.length).toBe(2) // urgent and bulk of the one link: never dialled again
    expect(source.phase).toBe('failed')
    expect(await pair.destFailed).toMatchObject({ code: 'ERR_MIGRATION_ABORTED' })
  }, 10_000)

  it('gives up before the hand-off: the source reports the ERROR arriving on bulk after urgent closed (not "urgent connection closed")', async () => {
    const pair = makePair([64], (src, regions) => {
      for (let p = 0; p < 64; p++) src.write(regions[0].id, p * 4096, pageBytes(0, p, 0))
    })
    pair.dst.install = (_id, offset, length) => {
      throw installFailedError(12, 0, offset / 4096, length / 4096)
    }
    let raced = false
    pair.onFrame = (from, type) => {
      if (from !== 'destination' || type !== Msg.ERROR || raced) return undefined
      // its ERROR is being written on bulk; its urgent connection ends at once, bulk's bytes reach the source 20 ms later
      raced = true
      const bulk = pair.links[pair.links.length - 1]
      bulk.pause()
      setTimeout(() => bulk.resume(), 20)
      return undefined
    }
    const { source, report } = startSource(pair, { mode: 'precopy' })
    const err = await report.then(() => undefined, (e: Error) => e)
    expect(raced).toBe(true)
    expect(err).toMatchObject({ code: 'ERR_MIGRATION_ABORTED' })
    expect(err!.message).toMatch(/could not place \d+ page\(s\) of region 0 from page \d+: ENOMEM/)
    expect(source.phase).toBe('failed')
    expect(pair.resumedOnSource).toBe(0) // never paused: the service ran on here throughout
  }, 10_000)

  it('gives up before the hand-off, its ERROR on bulk lost (bulk full of unread pages ends in a reset): urgent carries the reason too', async () => {
    const pair = makePair([64], (src, regions) => {
      for (let p = 0; p < 64; p++) src.write(regions[0].id, p * 4096, pageBytes(0, p, 0))
    })
    pair.dst.install = (_id, offset, length) => {
      throw installFailedError(12, 0, offset / 4096, length / 4096)
    }
    let errors = 0
    pair.onFrame = (from, type) => (from === 'destination' && type === Msg.ERROR && ++errors === 1 ? 'drop' : undefined)
    const { report } = startSource(pair, { mode: 'precopy' })
    const err = await report.then(() => undefined, (e: Error) => e)
    expect(errors).toBe(2) // bulk's (lost), then urgent's; never two on one connection
    expect(err).toMatchObject({ code: 'ERR_MIGRATION_ABORTED' })
    expect(err!.message).toMatch(/could not place \d+ page\(s\) of region 0 from page \d+: ENOMEM/)
  }, 10_000)
})
