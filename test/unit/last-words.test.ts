/**
 * A side that gives up of its own accord tells the other why, on urgent and bulk, and the other takes that reason
 * whichever connection tells it first that the link ended.
 * - The destination cannot place pages (ENOMEM): the source fails with that reason, not "connection closed by the
 *   peer", and after the hand-off it does not dial a destination that gave up (seen in CI: the demand connection's end
 *   came first, and the source dialled for 60 s).
 * - The source fails on its own (its service's pause, a bug): before the hand-off the destination's session ends with
 *   that reason; after it the destination fails at once instead of waiting out its recovery window.
 * A broken link is not "told", the peer's own ERROR is never told back, and a connection carries one ERROR at most.
 */
import { describe, expect, it } from 'vitest'
import { installFailedError } from '../../src/agent/demand-events'
import type { MigrationReport } from '../../src/agent/report'
import { ErrorCode, migrationError } from '../../src/errors'
import { Msg } from '../../src/protocol/messages'
import { makePair, pageBytes, type Pair, startSource, touchAll } from './helpers/wire'

const NO_ROOM = /could not place \d+ page\(s\) of region 0 from page \d+: ENOMEM/

function filledPair(): Pair {
  return makePair([64], (src, regions) => {
    for (let p = 0; p < 64; p++) src.write(regions[0].id, p * 4096, pageBytes(0, p, 0))
  })
}

/** From now on the destination cannot place a page (its memory cgroup is full). */
function fillUp(pair: Pair): void {
  pair.dst.install = (_id, offset, length) => {
    throw installFailedError(12, 0, offset / 4096, length / 4096)
  }
}

function failure(report: Promise<MigrationReport>): Promise<Error | undefined> {
  return report.then(() => undefined, (e: Error) => e)
}

describe('the destination gives up: the source takes its ERROR, whichever connection ends first', () => {
  it('after the hand-off: the ERROR arrives on bulk after another connection closed; the source fails with it and does not dial back', async () => {
    const pair = filledPair()
    let raced = false
    pair.onFrame = (from, type) => {
      if (from === 'destination' && type === Msg.RESUMED) fillUp(pair) // the service runs there
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
    const err = await failure(report)
    expect(raced).toBe(true)
    expect(err).toMatchObject({ code: 'ERR_MIGRATION_ABORTED', message: expect.stringMatching(NO_ROOM) })
    expect(pair.links.length).toBe(2) // urgent and bulk of the one link: never dialled again
    expect(source.phase).toBe('failed')
    expect(await pair.destFailed).toMatchObject({ code: 'ERR_MIGRATION_ABORTED' })
  }, 10_000)

  it('before the hand-off: the ERROR arrives on bulk after urgent closed; the source reports it (not "urgent connection closed")', async () => {
    const pair = filledPair()
    fillUp(pair)
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
    const err = await failure(report)
    expect(raced).toBe(true)
    expect(err).toMatchObject({ code: 'ERR_MIGRATION_ABORTED', message: expect.stringMatching(NO_ROOM) })
    expect(source.phase).toBe('failed')
    expect(pair.resumedOnSource).toBe(0) // never paused: the service ran on here throughout
  }, 10_000)

  it('before the hand-off, its ERROR on bulk lost (bulk full of unread pages ends in a reset): urgent carries the reason too', async () => {
    const pair = filledPair()
    fillUp(pair)
    let errors = 0
    pair.onFrame = (from, type) => (from === 'destination' && type === Msg.ERROR && ++errors === 1 ? 'drop' : undefined)
    const err = await failure(startSource(pair, { mode: 'precopy' }).report)
    expect(errors).toBe(2) // bulk's (lost), then urgent's; never two on one connection
    expect(err).toMatchObject({ code: 'ERR_MIGRATION_ABORTED', message: expect.stringMatching(NO_ROOM) })
  }, 10_000)
})

describe('the destination finds its source stuck after the hand-off, with recovery off', () => {
  it('it fails, and says why on every connection: the source reports the destination\'s reason, not a connection closed', async () => {
    const pair = filledPair()
    let resumed = false
    pair.onFrame = (from, type) => {
      if (from === 'destination' && type === Msg.RESUMED) resumed = true
      // the service runs there; from now on no page of the source's arrives (its replies, its push): stuck, seen from there
      return resumed && from === 'source' && type === Msg.PAGES ? 'drop' : undefined
    }
    const { source, report } = startSource(pair, { mode: 'postcopy', extra: { recoveryTimeoutMs: 0, requestTimeoutMs: 300 } })
    void pair.restored.then(() => touchAll(pair)).catch(() => {})
    const err = await failure(report)
    expect(await pair.destFailed).toMatchObject({ code: 'ERR_MIGRATION_CONNECTION', message: expect.stringMatching(/^the source looks stuck/) })
    // (before: nothing was told after the hand-off, and the source failed with "... connection closed by the peer")
    expect(err).toMatchObject({ code: 'ERR_MIGRATION_CONNECTION', message: expect.stringMatching(/^peer reported: the source looks stuck.*after the hand-off: the source keeps its memory/) })
    expect(source.phase).toBe('failed')
    expect(pair.resumedOnSource).toBe(0)
  }, 15_000)
})

describe('the source gives up: the destination hears why', () => {
  it('before the hand-off: the destination ends the session with the source\'s reason', async () => {
    const pair = filledPair()
    const err = await failure(startSource(pair, { mode: 'hybrid', pauseFails: migrationError(ErrorCode.PAUSE, 'pause() failed: database busy') }).report)
    expect(err).toMatchObject({ code: 'ERR_GUEST_PAUSE' })
    await new Promise((r) => setTimeout(r, 50))
    expect(pair.events.filter((e) => e.startsWith('ended:'))).toEqual(['ended:ERR_GUEST_PAUSE:peer reported: pause() failed: database busy'])
  }, 10_000)

  it('after the hand-off: the destination fails at once with the source\'s reason, and does not wait to recover', async () => {
    const pair = filledPair()
    pair.onFrame = (from, type) => {
      // the service runs there; from now on the source cannot read its own memory (a bug, say): the push fails
      if (from === 'destination' && type === Msg.RESUMED) {
        pair.src.zeroPages = () => {
          throw migrationError(ErrorCode.GENERIC, 'the source could not read region 0')
        }
      }
      return undefined
    }
    const { report } = startSource(pair, { mode: 'postcopy', extra: { recoveryTimeoutMs: 60_000 } }) // (the test's own timeout is shorter)
    expect(await failure(report)).toMatchObject({ code: ErrorCode.GENERIC })
    expect(await pair.destFailed).toMatchObject({ code: ErrorCode.GENERIC, message: expect.stringMatching(/^peer reported: the source could not read region 0/) })
    expect(pair.events).not.toContain('recovering')
  }, 15_000)
})
