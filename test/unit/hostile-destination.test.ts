/**
 * A destination that breaks the protocol, seen from the source (pure tier: fake bindings, in-memory transports).
 * Whatever it says, the source must end (settle, or fail with a code) rather than wait for ever with its memory held,
 * and its service must run on exactly one host. The source-side fuzzer (src/testing/fuzz/source-session.ts) found
 * these; each case here fails without its fix.
 */
import { describe, expect, it } from 'vitest'
import type { MigrationReport } from '../../src/agent/report'
import { Msg } from '../../src/protocol/messages'
import { makePair, pageBytes, startSource } from './helpers/wire'

const failure = (report: Promise<MigrationReport>) => report.then(() => undefined, (e: Error) => e)
/** Turns a wait for ever into a result the test can show (only a hang takes this long). */
const orHang = <T>(p: Promise<T>) => Promise.race([p, new Promise<'still waiting'>((r) => setTimeout(() => r('still waiting'), 8000))])

describe('a destination that breaks the protocol', () => {
  it('SETTLED without RESUMED before it: the source fails as a protocol error (it waited for ever, its memory held), and does not resume its service', async () => {
    const pair = makePair([16], (src, regions) => {
      for (let p = 0; p < 16; p++) src.write(regions[0].id, p * 4096, pageBytes(0, p, 0))
    })
    // pre-copy: the destination lacks nothing at the hand-off and settles as it resumes; its RESUMED goes missing
    pair.onFrame = (from, type) => (from === 'destination' && type === Msg.RESUMED ? 'drop' : undefined)
    const { source, report } = startSource(pair, { mode: 'precopy' })
    const err = await orHang(failure(report))
    expect(err).toMatchObject({ code: 'ERR_MIGRATION_PROTOCOL', message: expect.stringMatching(/the destination said SETTLED before RESUMED/) })
    expect(source.phase).toBe('failed')
    // the hand-off went: the service may run there, so it does not run here too, and the source keeps its memory
    expect(pair.resumedOnSource).toBe(0)
    expect((err as { afterHandoff?: boolean }).afterHandoff).toBe(true)
  }, 20_000)
})
