/** Failures the engines must turn into a clear error and a service that runs somewhere. */
import { describe, expect, it } from 'vitest'
import { ErrorCode } from '../../src/errors'
import { encodeRuns, Msg, RangeKind } from '../../src/protocol/messages'
import type { FakeBinding } from '../../src/testing/fake-binding'
import type { Region } from '../../src/region'
import { cutOnFirst, makePair, pageBytes, startSource } from './helpers/wire'

const fill = (src: FakeBinding, regions: Region[]) =>
  regions.forEach((r, i) => {
    for (let p = 0; p < r.pageCount; p += 2) src.write(r.id, p * 4096, pageBytes(i, p, 0))
  })

describe('engine failures', () => {
  for (const mode of ['hybrid', 'precopy'] as const) {
    it(`${mode}: a hand-off state the destination cannot restore resumes the service on the source`, async () => {
      const pair = makePair([32], fill)
      pair.failRestore = true
      const { source, report } = startSource(pair, { mode })
      const err = await report.then(() => undefined, (e) => e)
      expect(err?.code).toBe(ErrorCode.HANDOFF)
      expect(err.message).toMatch(/could not restore the hand-off state/)
      expect(err.message).toMatch(/the service resumed on the source/)
      expect(pair.resumedOnSource).toBe(1)
      expect(source.phase).toBe('failed')
      const destErr = await pair.destFailed
      expect((destErr as { code?: string }).code).toBe(ErrorCode.HANDOFF)
      expect(pair.dest.phase).toBe('failed')
    })
  }

  it('a destination that fails after RESUMED does not make the source resume (the service runs there)', async () => {
    const pair = makePair([32], fill)
    pair.onFrame = (from, type) => {
      // the destination sends a message the source never accepts, after it resumed the service
      if (from === 'destination' && type === Msg.RESUMED) {
        queueMicrotask(() => pair.dest.close())
      }
      return undefined
    }
    const { report } = startSource(pair, { mode: 'postcopy', extra: { recoveryTimeoutMs: 0 } })
    await expect(report).rejects.toMatchObject({ message: expect.stringMatching(/keeps its memory/) })
    expect(pair.resumedOnSource).toBe(0)
  })

  it('a reset before the hand-off fails the source with what the errno means, and the service runs on', async () => {
    const pair = makePair([64], fill)
    const link = cutOnFirst(pair, 'source', Msg.PAGES)
    const { report } = startSource(pair, { mode: 'hybrid' })
    const err = await report.then(() => undefined, (e) => e)
    expect(link.cut).toBe(true)
    expect(err?.code).toBe(ErrorCode.CONNECTION)
    // the errno, and what it means for the operator
    expect(err.message).toMatch(/connection failed: read ECONNRESET \(reset by the peer's host, or by a firewall/)
    expect(pair.events).not.toContain('restore') // the service never left the source
  })

  it('a destination that cannot hold the guest refuses it at REGIONS, before any page moves; it takes the guest once there is room', async () => {
    const pair = makePair([64], fill) // 32 pages written: 128 KiB resident
    let pagesSent = 0
    pair.onFrame = (from, type) => void (from === 'source' && type === Msg.PAGES && pagesSent++)
    pair.headroom = { bytes: (64 << 20) + (64 << 10), limitedBy: 'the memory cgroup /svc (memory.max 80.0 MiB)' }
    const refused = await startSource(pair, { mode: 'postcopy' }).report.then(() => undefined, (e) => e)
    expect(refused?.code).toBe(ErrorCode.MEMORY)
    expect(refused.message).toMatch(/the destination cannot hold this guest: it has 128\.0 KiB resident at the source and 64\.1 MiB can still be allocated here, limited by the memory cgroup \/svc \(memory\.max 80\.0 MiB\) \(64\.0 MiB are kept/)
    expect(pagesSent).toBe(0)
    expect(pair.events).not.toContain('restore') // the service never left the source
    expect(pair.events.some((e) => e.startsWith('ended:ERR_MIGRATION_MEMORY:'))).toBe(true) // and the destination listens again
    // 128 KiB more than the margin: it fits
    pair.headroom = { bytes: (64 << 20) + (128 << 10), limitedBy: 'the memory cgroup /svc' }
    const { report } = startSource(pair, { mode: 'postcopy' })
    await pair.restored
    await expect(report).resolves.toMatchObject({ mode: 'postcopy' })
    expect(pagesSent).toBeGreaterThan(0)
  })

  it('a message outside its phase ends the migration with ERR_MIGRATION_PROTOCOL on the source, and the service runs on', async () => {
    const pair = makePair([64], fill)
    let injected = false
    pair.onFrame = (from, type) => {
      // FREED is legal only after the hand-off: inject one right behind REGIONS_OK
      if (!injected && from === 'destination' && type === Msg.REGIONS_OK) {
        injected = true
        queueMicrotask(() => (pair.dest as unknown as { link: { bulk: { send(b: Buffer): void } } }).link.bulk.send(encodeRuns(Msg.FREED, RangeKind.FREE, 0, [0, 1])))
      }
      return undefined
    }
    const { report } = startSource(pair, { mode: 'hybrid' })
    const err = await report.then(() => undefined, (e) => e)
    expect(err?.code).toBe(ErrorCode.PROTOCOL)
    expect(err.message).toMatch(/FREED is not legal in phase connect/)
    expect(pair.resumedOnSource).toBe(0) // it never paused: it never stopped running
    expect(pair.events).not.toContain('restore')
  })
})
