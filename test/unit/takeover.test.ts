/**
 * A new source agent takes over (MigrationSource.takeOver(), in memory): the first source "crashes" (its link cut and
 * every dial it tries refused from then on, as a dead thread dials nothing), and a second one with the migration's
 * session dials in and asks. HANDOFF arrived: post-copy goes on and every byte arrives once. HANDOFF lost in flight:
 * the destination says NO_SESSION and the service resumes at the source. Meanwhile a cancel cannot be taken.
 */
import { describe, expect, it } from 'vitest'
import { MigrationSource } from '../../src/agent/source/index'
import { Msg } from '../../src/protocol/messages'
import type { Region } from '../../src/region'
import type { FakeBinding } from '../../src/testing/fake-binding'
import { makePair, pageBytes, sameBytes, sourceOptions, startSource, touchAll, type Pair } from './helpers/wire'

function fill(src: FakeBinding, regions: Region[]): void {
  regions.forEach((r, i) => {
    for (let p = 0; p < r.pageCount; p++) if (p % 3 !== 2) src.write(r.id, p * 4096, pageBytes(i, p, 0))
  })
}

const SESSION = 'a1b2c3d4e5f6a1b2c3d4e5f6'

/** The first source: dials refused once it "crashed" (its link cut at the chosen frame). */
function crashingSource(pair: Pair, crashOn: (from: 'source' | 'destination', type: number) => boolean, recoveryTimeoutMs = 500) {
  let crashed = false
  pair.onFrame = (from, type) => {
    if (crashed || !crashOn(from, type)) return undefined
    crashed = true
    return 'cut'
  }
  const base = sourceOptions(pair, 'postcopy').dial!
  const started = startSource(pair, {
    mode: 'postcopy',
    // (its own recovery gives up after recoveryTimeoutMs: the destination, told so in HANDOFF, waits as long for the new agent)
    extra: { session: SESSION, recoveryTimeoutMs, prepaging: { strategy: 'push' }, dial: async (...a) => {
      if (crashed) throw Object.assign(new Error('this agent is gone'), { code: 'ERR_MIGRATION_CONNECT' })
      return base(...a)
    } },
  })
  return { ...started, crashed: () => crashed }
}

function newAgent(pair: Pair, linkTimeoutMs = 0): MigrationSource {
  return new MigrationSource(pair.src, pair.srcRegions, sourceOptions(pair, 'postcopy', { session: SESSION, prepaging: { strategy: 'push' }, linkTimeoutMs }), {
    pause: async () => ({ state: new Uint8Array() }),
    resume: () => pair.resumedOnSource++,
    progress: () => {},
    takeFreed: () => [],
  })
}

describe('a new agent takes the migration over', () => {
  it('HANDOFF arrived: post-copy goes on from what the destination holds; every byte once; a cancel meanwhile is refused', async () => {
    const pair = makePair([200, 60], fill)
    let pushed = 0
    const first = crashingSource(pair, (from, type) => pair.events.includes('restore') && from === 'source' && type === Msg.PAGES && ++pushed === 4)
    await pair.restored
    const touching = touchAll(pair, 'random', 7)
    while (!first.crashed()) await new Promise((r) => setTimeout(r, 1))
    const agent = newAgent(pair)
    const report = agent.takeOver({ phase: 'postcopy', message: 'boom', startedAtMs: 0 })
    expect(agent.cancel()).toMatchObject({ code: 'ERR_MIGRATION_CANCEL_REFUSED', message: expect.stringMatching(/a new migration agent is asking memory:1 whether the hand-off arrived/) })
    const rep = await report
    await touching
    await pair.settled
    expect(rep.takeover).toEqual({ crashedInPhase: 'postcopy', message: 'boom' })
    expect(rep.precopyStop).toBe('unknown (agent restarted)')
    expect(rep.pagesSentTwiceAfterHandoff).toBe(0)
    expect(rep.postcopy.pushedPages + rep.postcopy.demandPages).toBeGreaterThan(0)
    expect(sameBytes(pair)).toBeUndefined()
    expect(pair.resumedOnSource).toBe(0)
    await first.report.catch(() => {}) // the first one's own recovery gave up (it was "dead")
  })

  it('HANDOFF lost with the crash: the destination has no session, the service resumes at the source', async () => {
    const pair = makePair([100], fill)
    const first = crashingSource(pair, (from, type) => from === 'source' && type === Msg.HANDOFF)
    await expect(first.report).rejects.toMatchObject({ code: 'ERR_MIGRATION_CONNECTION' })
    expect(pair.events).not.toContain('restore')
    // the first one committed as HANDOFF left: it could not know that it was lost, so it did not resume the service
    expect(pair.resumedOnSource).toBe(0)
    const agent = newAgent(pair)
    await expect(agent.takeOver({ phase: 'handoff', message: 'boom', startedAtMs: 0 })).rejects.toMatchObject({
      code: 'ERR_MIGRATION_NO_SESSION', message: expect.stringMatching(/\(the service resumed on the source\)$/),
    })
    expect(pair.resumedOnSource).toBe(1)
  })

  it('RECOVER unanswered (a destination stopped after the handshake): the new agent gives up on that link after linkTimeoutMs and dials again', async () => {
    const pair = makePair([100], fill)
    // (the destination waits 2.5 s for a source: longer than the new agent's wait for an answer)
    const first = crashingSource(pair, (from, type) => pair.events.includes('restore') && from === 'source' && type === Msg.PAGES, 2500)
    await pair.restored
    while (!first.crashed()) await new Promise((r) => setTimeout(r, 1))
    let recovers = 0
    pair.onFrame = (from, type) => (from === 'source' && type === Msg.RECOVER && ++recovers === 1 ? 'drop' : undefined)
    const t0 = Date.now()
    const rep = await newAgent(pair, 1000).takeOver({ phase: 'postcopy', message: 'boom', startedAtMs: 0 })
    expect(recovers).toBe(2) // before: it waited for RECOVER_STATE for ever on the first link
    expect(Date.now() - t0).toBeGreaterThanOrEqual(900)
    await pair.settled
    expect(rep.pagesSentTwiceAfterHandoff).toBe(0)
    expect(sameBytes(pair)).toBeUndefined()
    await first.report.catch(() => {})
  })
})
