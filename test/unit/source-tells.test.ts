/**
 * A source that fails of its own accord (its service's pause, a tracker, a bug) tells the destination why, on urgent
 * and bulk. Before the hand-off the destination's log says the reason, not "connection closed by the peer"; after it
 * the destination fails at once with that reason, instead of waiting out its recovery window for a source that will
 * not come back. A broken link is not "told", and the destination's own ERROR is never told back.
 */
import { describe, expect, it } from 'vitest'
import { ErrorCode, migrationError } from '../../src/errors'
import { Msg } from '../../src/protocol/messages'
import { makePair, pageBytes, startSource } from './helpers/wire'

function filled() {
  return makePair([64], (src, regions) => {
    for (let p = 0; p < 64; p++) src.write(regions[0].id, p * 4096, pageBytes(0, p, 0))
  })
}

describe('the source tells the destination why it gave up', () => {
  it('before the hand-off: the destination ends the session with the source\'s reason', async () => {
    const pair = filled()
    const { report } = startSource(pair, { mode: 'hybrid', pauseFails: migrationError(ErrorCode.PAUSE, 'pause() failed: database busy') })
    const err = await report.then(() => undefined, (e: Error) => e)
    expect(err).toMatchObject({ code: 'ERR_GUEST_PAUSE' })
    await new Promise((r) => setTimeout(r, 50))
    expect(pair.events.filter((e) => e.startsWith('ended:'))).toEqual(['ended:ERR_GUEST_PAUSE:peer reported: pause() failed: database busy'])
  }, 10_000)

  it('after the hand-off: the destination fails at once with the source\'s reason, and does not wait to recover', async () => {
    const pair = filled()
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
    const err = await report.then(() => undefined, (e: Error) => e)
    expect(err).toMatchObject({ code: ErrorCode.GENERIC })
    const destErr = await pair.destFailed
    expect(destErr).toMatchObject({ code: ErrorCode.GENERIC, message: expect.stringMatching(/^peer reported: the source could not read region 0/) })
    expect(pair.events).not.toContain('recovering')
  }, 15_000)
})
