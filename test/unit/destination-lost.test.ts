/**
 * A destination lost after the hand-off (it went away with the service, and nobody answers the recovery): by default
 * the migration fails and the source keeps its memory, as before; with onDestinationLost 'resume' the service resumes
 * at the source with its state as of the hand-off, but only once the destination's own recovery window has surely
 * ended its service there, so that it never runs on both hosts. Pure tier: fake bindings, in-memory transports.
 */
import { describe, expect, it } from 'vitest'
import type { MigrationReport } from '../../src/agent/report'
import { validateMigrateOptions } from '../../src/options'
import { installFailedError } from '../../src/agent/demand-events'
import { Msg } from '../../src/protocol/messages'
import { makePair, pageBytes, type Pair, startSource } from './helpers/wire'

const filledPair = () => makePair([64], (src, regions) => {
  for (let p = 0; p < 64; p++) src.write(regions[0].id, p * 4096, pageBytes(0, p, 0))
})

/** The destination runs the service (RESUMED came), then is gone: its links cut, every dial refused from then on. */
function loseDestinationAfterResume(pair: Pair): { readonly lostAtMs: number } {
  const state = { lostAtMs: 0 }
  let resumed = false
  pair.onFrame = (from, type) => {
    if (from === 'destination' && type === Msg.RESUMED) resumed = true
    if (!resumed || state.lostAtMs || from !== 'source' || type !== Msg.PAGES) return undefined
    state.lostAtMs = Date.now()
    pair.refuseDials = true
    return 'cut'
  }
  return state
}

const failure = (report: Promise<MigrationReport>) => report.then(() => undefined, (e: Error) => e)

describe('a destination lost after the hand-off', () => {
  it("'fail' (the default): the migration fails, the service is not resumed here, the source kept its memory", async () => {
    const pair = filledPair()
    loseDestinationAfterResume(pair)
    const { source, report } = startSource(pair, { mode: 'postcopy', extra: { recoveryTimeoutMs: 200, linkTimeoutMs: 1000, prepaging: { strategy: 'push' } } })
    const err = await failure(report)
    expect(err).toMatchObject({ code: 'ERR_MIGRATION_CONNECTION', afterHandoff: true })
    expect(pair.resumedOnSource).toBe(0)
    expect(source.fate.state).toBe('there')
  }, 15_000)

  it("'resume': once the destination's own window has ended its service there, the service resumes here with its state as of the hand-off", async () => {
    const pair = filledPair()
    const lost = loseDestinationAfterResume(pair)
    let resumedAtMs = 0
    const destFailedAtMs = pair.destFailed.then(() => Date.now())
    const { source, report } = startSource(pair, { mode: 'postcopy', extra: { recoveryTimeoutMs: 200, linkTimeoutMs: 1000, prepaging: { strategy: 'push' }, onDestinationLost: 'resume' } })
    const err = await failure(report.finally(() => (resumedAtMs = Date.now())))
    expect(lost.lostAtMs).toBeGreaterThan(0)
    expect(err).toMatchObject({ code: 'ERR_MIGRATION_CONNECTION', message: expect.stringMatching(/the destination was lost after the hand-off: the service resumed on the source with its state as of the hand-off/) })
    expect(err).not.toHaveProperty('afterHandoff')
    expect(pair.resumedOnSource).toBe(1)
    expect(source.fate.state).toBe('reclaimed')
    // never on both hosts: the destination's service had failed (its window, 200 ms) before the source resumed its own,
    // which waited its window, then linkTimeoutMs and a margin more (the destination may have noticed the break that late)
    expect(await destFailedAtMs).toBeLessThan(resumedAtMs)
    expect(resumedAtMs - lost.lostAtMs).toBeGreaterThanOrEqual(200 + 1000 + 1000 - 50)
  }, 15_000)

  it("'resume', and the destination said it failed (it could not place pages): its service ended at once, so the source resumes its own at once", async () => {
    const pair = filledPair()
    pair.onFrame = (from, type) => {
      // the service runs there; from now on that host cannot place a page (its memory cgroup is full)
      if (from === 'destination' && type === Msg.RESUMED) {
        pair.dst.install = (_id, offset, length) => {
          throw installFailedError(12, 0, offset / 4096, length / 4096)
        }
      }
      return undefined
    }
    const t0 = Date.now()
    const { source, report } = startSource(pair, { mode: 'postcopy', extra: { recoveryTimeoutMs: 60_000, linkTimeoutMs: 5000, prepaging: { strategy: 'push' }, onDestinationLost: 'resume' } })
    const err = await failure(report)
    expect(err).toMatchObject({ code: 'ERR_MIGRATION_ABORTED', fromPeer: true, message: expect.stringMatching(/could not place .*ENOMEM.*the destination was lost after the hand-off: the service resumed on the source/) })
    expect(pair.resumedOnSource).toBe(1)
    expect(source.fate.state).toBe('reclaimed')
    expect(await pair.destFailed).toMatchObject({ code: 'ERR_MIGRATION_ABORTED' })
    expect(Date.now() - t0).toBeLessThan(5000) // (no wait for a window: it said so)
  }, 15_000)

  it("the option: 'fail' or 'resume', and 'resume' only with linkTimeoutMs > 0 (a destination behind a silent link would never give its service up)", () => {
    const token = 'a'.repeat(32)
    expect(validateMigrateOptions({ to: 'h:1' }, token)).not.toHaveProperty('onDestinationLost')
    expect(validateMigrateOptions({ to: 'h:1', onDestinationLost: 'resume' }, token).onDestinationLost).toBe('resume')
    expect(() => validateMigrateOptions({ to: 'h:1', onDestinationLost: 'retry' as never }, token)).toThrow(/expected onDestinationLost 'fail' or 'resume', got "retry"/)
    expect(() => validateMigrateOptions({ to: 'h:1', onDestinationLost: 'resume', linkTimeoutMs: 0 }, token)).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG', message: expect.stringMatching(/needs linkTimeoutMs > 0/) }))
  })
})
