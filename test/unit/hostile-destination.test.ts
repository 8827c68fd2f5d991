/**
 * A destination that breaks the protocol, seen from the source (pure tier: fake bindings, in-memory transports).
 * Whatever it says, the source must end (settle, or fail with a code) rather than wait for ever with its memory held,
 * and its service must run on exactly one host. The source-side fuzzer (src/testing/fuzz/source-session.ts) found
 * these; each case here fails without its fix.
 */
import { describe, expect, it } from 'vitest'
import type { MigrationReport } from '../../src/agent/report'
import { encodeControl, Msg } from '../../src/protocol/messages'
import { makePair, pageBytes, startSource } from './helpers/wire'

const failure = (report: Promise<MigrationReport>) => report.then(() => undefined, (e: Error) => e)
/** Turns a wait for ever into a result the test can show (only a hang takes this long). */
const orHang = <T>(p: Promise<T>) => Promise.race([p, new Promise<'still waiting'>((r) => setTimeout(() => r('still waiting'), 8000))])

describe('a destination that breaks the protocol', () => {
  it('SETTLED without RESUMED before it: the source takes it for a broken link and asks, instead of waiting for ever with its memory held', async () => {
    const pair = makePair([16], (src, regions) => {
      for (let p = 0; p < 16; p++) src.write(regions[0].id, p * 4096, pageBytes(0, p, 0))
    })
    // pre-copy: the destination lacks nothing at the hand-off and settles as it resumes; its RESUMED goes missing
    pair.onFrame = (from, type) => (from === 'destination' && type === Msg.RESUMED ? 'drop' : undefined)
    const { source, report } = startSource(pair, { mode: 'precopy' })
    const outcome = await orHang(report.then((r) => r, (e: Error) => e))
    // it asked (one recovery): the destination's answer, settled with its resume time, ends the migration
    expect(outcome).toMatchObject({ postcopy: { recoveries: 1, pagesLocalAtDestination: 16 } })
    expect(source.phase).toBe('settled')
    expect(pair.events).toEqual(['restore', 'settled'])
    expect(pair.resumedOnSource).toBe(0)
  }, 20_000)

  it('a frame that breaks the protocol right after HANDOFF, before the destination read it: the source asks, hears NO_SESSION and resumes its service (it ran nowhere)', async () => {
    const pair = makePair([16], (src, regions) => {
      for (let p = 0; p < 16; p++) src.write(regions[0].id, p * 4096, pageBytes(0, p, 0))
    })
    let injected = false
    pair.onFrame = (from, type) => {
      if (from !== 'source' || type !== Msg.HANDOFF || injected) return undefined
      injected = true
      // the destination reads bulk late (its HANDOFF waits), and says something on urgent that only bulk may carry:
      // the source's urgent channel answers ERROR, which the destination reads first, before the hand-off
      const [urgent, bulk] = pair.links.slice(-2)
      bulk.peer.pause()
      urgent.peer.write(Buffer.concat(encodeControl(Msg.SERVICE, { ports: [] })))
      setTimeout(() => bulk.peer.resume(), 50)
      return undefined
    }
    const { source, report } = startSource(pair, { mode: 'precopy' })
    const err = await orHang(failure(report))
    expect(injected).toBe(true)
    // the destination never restored the service; the source learnt so and runs it again (before: ERR_MIGRATION_PROTOCOL,
    // the service paused here and never started there)
    expect(pair.events).not.toContain('restore')
    expect(err).toMatchObject({ code: 'ERR_MIGRATION_NO_SESSION' })
    expect(pair.resumedOnSource).toBe(1)
    expect(source.phase).toBe('failed')
  }, 20_000)

  it('a recovery whose answer comes mangled dials again: the destination never took the hand-off, and its NO_SESSION on the next try resumes the service here', async () => {
    const pair = makePair([16], (src, regions) => {
      for (let p = 0; p < 16; p++) src.write(regions[0].id, p * 4096, pageBytes(0, p, 0))
    })
    let lost = false, mangled = false
    pair.onFrame = (from, type) => {
      // HANDOFF is lost with a reset: the destination ends its session and listens again
      if (from === 'source' && type === Msg.HANDOFF && !lost) return (lost = true), 'cut'
      // the answer to the first RECOVER (its NO_SESSION) arrives as something else
      if (from === 'destination' && type === Msg.ERROR && lost && !mangled) {
        mangled = true
        const bulk = pair.links[pair.links.length - 1]
        setImmediate(() => bulk.peer.write(Buffer.concat(encodeControl(Msg.SYNC, {}))))
        return 'drop'
      }
      return undefined
    }
    const { report } = startSource(pair, { mode: 'precopy' })
    const err = await orHang(failure(report))
    expect([lost, mangled]).toEqual([true, true])
    // (before: the malformed answer ended the recovery, and the service stayed paused here, never started there)
    expect(err).toMatchObject({ code: 'ERR_MIGRATION_NO_SESSION' })
    expect(pair.resumedOnSource).toBe(1)
    expect(pair.events).not.toContain('restore')
    // three links: the first, the recovery whose answer was mangled, and the one that heard NO_SESSION
    expect(pair.links.length).toBe(6)
  }, 20_000)
})
