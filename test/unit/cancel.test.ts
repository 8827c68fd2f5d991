/**
 * Cancel before the hand-off and a destination that only the hand-off
 * commits, in memory: the source's service runs on, the destination goes
 * back to listening with nothing kept, and the next migration succeeds.
 */
import { describe, expect, it } from 'vitest'
import { ErrorCode } from '../../src/errors'
import { Msg } from '../../src/protocol/messages'
import type { FakeBinding } from '../../src/testing/fake-binding'
import type { Region } from '../../src/region'
import { cutOnFirst, makePair, pageBytes, sameBytes, startSource, touchAll } from './helpers/wire'
import type { Pair } from './helpers/wire'

const fill = (src: FakeBinding, regions: Region[]) =>
  regions.forEach((r, i) => {
    for (let p = 0; p < r.pageCount; p++) if (p % 4) src.write(r.id, p * 4096, pageBytes(i, p, 0))
  })

/** The destination after a cancelled session: listening, nothing received, regions empty. */
function expectListeningAndEmpty(pair: Pair) {
  expect(pair.dest.phase).toBe('listening')
  expect(pair.received.every((m) => m.count() === 0)).toBe(true)
  for (const r of pair.dstRegions) expect(new Uint8Array(r.buffer).every((b) => b === 0)).toBe(true)
  expect(pair.events).not.toContain('restore')
}

/** A second migration to the same destination, which must succeed. */
async function migrateAgain(pair: Pair) {
  const { report } = startSource(pair, { mode: 'hybrid' })
  await pair.restored
  await touchAll(pair)
  const rep = await report
  expect(sameBytes(pair)).toBeUndefined()
  expect(rep.pagesSentTwiceAfterHandoff).toBe(0)
}

describe('cancel before the hand-off', () => {
  it('in round 0: the source runs on, the destination listens again, the next migration succeeds', async () => {
    const pair = makePair([120, 30], fill)
    let cancelAt: (() => void) | undefined
    pair.onFrame = (from, type) => {
      if (from === 'source' && type === Msg.PAGES) cancelAt?.()
      return undefined
    }
    const { source, report } = startSource(pair, { mode: 'hybrid' })
    cancelAt = () => {
      cancelAt = undefined
      expect(source.cancel()).toBeUndefined()
    }
    const err = await report.then(() => undefined, (e) => e)
    expect(err?.code).toBe(ErrorCode.CANCELLED)
    expect(err.message).toMatch(/cancelled in phase precopy \(round 0\), before the hand-off: the service runs on here/)
    expect(pair.resumedOnSource).toBe(0) // never paused
    expect(source.phase).toBe('failed')
    expectListeningAndEmpty(pair) // already: a cancel returns once the destination hung up
    await migrateAgain(pair)
  })

  it('in a later round', async () => {
    const pair = makePair([64], fill)
    let rounds = 0
    const src = { s: undefined as undefined | ReturnType<typeof startSource>['source'] }
    const { source, report } = startSource(pair, {
      mode: 'precopy',
      extra: { downtimeMs: 0.001, maxRounds: 50 },
      writer: (b, regions) => {
        b.write(regions[0].id, 0, pageBytes(0, 0, rounds))
        b.write(regions[0].id, 4096, pageBytes(0, 1, rounds))
      },
      // called once at the start of each round
      freed: () => {
        if (++rounds === 3) src.s!.cancel()
        return []
      },
    })
    src.s = source
    const err = await report.then(() => undefined, (e) => e)
    expect(err?.code).toBe(ErrorCode.CANCELLED)
    expect(err.message).toMatch(/in phase precopy \(round 2\)/)
    expectListeningAndEmpty(pair) // already: a cancel returns once the destination hung up
    await migrateAgain(pair)
  })

  it('while pause() runs: resume() comes after the pause finished', async () => {
    const pair = makePair([32], fill)
    const order: string[] = []
    let source!: ReturnType<typeof startSource>['source']
    const started = startSource(pair, { mode: 'hybrid' })
    source = started.source
    // wrap the hooks: a slow pause() that the cancel lands in
    const hooks = (source as unknown as { hooks: { pause(): Promise<{ state: Uint8Array }>; resume(): void } }).hooks
    hooks.pause = async () => {
      order.push('pause-start')
      expect(source.cancel()).toBeUndefined()
      await new Promise((r) => setTimeout(r, 30))
      order.push('pause-end')
      return { state: new Uint8Array(1) }
    }
    const resume = hooks.resume
    hooks.resume = () => {
      order.push('resume')
      resume()
    }
    const err = await started.report.then(() => undefined, (e) => e)
    expect(err?.code).toBe(ErrorCode.CANCELLED)
    expect(order).toEqual(['pause-start', 'pause-end', 'resume'])
    expect(pair.resumedOnSource).toBe(1)
    expectListeningAndEmpty(pair) // already: a cancel returns once the destination hung up
  })

  it('after the hand-off it is refused, and the migration completes', async () => {
    const pair = makePair([64], fill)
    const { source, report } = startSource(pair, { mode: 'postcopy' })
    await pair.restored
    const refused = source.cancel()
    expect(refused?.code).toBe(ErrorCode.CANCEL_REFUSED)
    expect(refused?.message).toMatch(/hand-off is done and the service already runs on the destination/)
    await touchAll(pair)
    await report
    expect(sameBytes(pair)).toBeUndefined()
  })

  it('a source that dies before the hand-off leaves the destination listening', async () => {
    const pair = makePair([64], fill)
    pair.onFrame = (from, type) => (from === 'source' && type === Msg.ROUND_END ? 'cut' : undefined)
    const { report } = startSource(pair, { mode: 'hybrid', extra: { recoveryTimeoutMs: 0 } })
    expect((await report.then(() => undefined, (e) => e))?.code).toBe(ErrorCode.CONNECTION)
    expectListeningAndEmpty(pair) // already: a cancel returns once the destination hung up
    pair.onFrame = undefined
    await migrateAgain(pair)
  })

  it('a reset that loses HANDOFF in flight: the destination listens again and the source runs its service on', async () => {
    const pair = makePair([64], fill)
    const link = cutOnFirst(pair, 'source', Msg.HANDOFF)
    const { report } = startSource(pair, { mode: 'hybrid' })
    const err = await report.then(() => undefined, (e) => e)
    expect(link.cut).toBe(true)
    expect(err?.code, err?.message).toBe(ErrorCode.NO_SESSION)
    expect(err.message).toMatch(/hand-off never arrived.*\(the service resumed on the source\)/)
    expect(pair.resumedOnSource).toBe(1)
    expectListeningAndEmpty(pair) // already: a cancel returns once the destination hung up
    pair.onFrame = undefined
    await migrateAgain(pair)
  })
})
