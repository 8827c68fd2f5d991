/**
 * A preflight (send --dry-run) against the real engines over in-memory links: the destination checks everything a
 * migration meets before its first page, answers, and moves nothing; it then takes a real migration as before.
 */
import { describe, expect, it } from 'vitest'
import { preflight } from '../../src/agent/source/preflight'
import { Msg } from '../../src/protocol/messages'
import type { FakeBinding } from '../../src/testing/fake-binding'
import type { Region } from '../../src/region'
import { makePair, pageBytes, sameBytes, sourceOptions, startSource } from './helpers/wire'

const fill = (src: FakeBinding, regions: Region[]) =>
  regions.forEach((r, i) => {
    for (let p = 0; p < r.pageCount; p += 2) src.write(r.id, p * 4096, pageBytes(i, p, 0))
  })
const MiB = 1 << 20

describe('preflight', () => {
  it('passes: the destination answers what it found, nothing moves, no session is left; a migration then moves the guest', async () => {
    const pair = makePair([64, 16], fill) // 32 + 8 pages written: 160 KiB resident
    const sent: number[] = []
    pair.onFrame = (from, type) => void (from === 'source' && sent.push(type))
    pair.headroom = { bytes: 512 * MiB, limitedBy: 'the memory cgroup /svc (memory.max 600.0 MiB)' }
    const r = await preflight(pair.src, pair.srcRegions, { ...sourceOptions(pair, 'hybrid', { streams: 3 }), session: 'feedc0de' })
    expect(r).toMatchObject({
      to: 'memory:1', migration: 'feedc0de', mode: 'hybrid', residentBytes: 160 << 10,
      regions: [{ name: 'r0', sizeBytes: 64 * 4096 }, { name: 'r1', sizeBytes: 16 * 4096 }],
      destination: { headroomBytes: 512 * MiB, limitedBy: 'the memory cgroup /svc (memory.max 600.0 MiB)', streams: 1 }, // (no native reader in the fake)
    })
    expect(r.totalMs).toBeGreaterThanOrEqual(r.connectMs)
    expect(['wp-async', 'sync-wp']).toContain(r.tracker.kind)
    expect(sent.filter((t) => t === Msg.PAGES || t === Msg.RANGES || t === Msg.HANDOFF)).toEqual([])
    expect(pair.events).toEqual(['preflight:feedc0de']) // quiet: no session-ended line, nothing restored
    const { report } = startSource(pair, { mode: 'hybrid' })
    await expect(report).resolves.toMatchObject({ mode: 'hybrid' })
    await pair.settled
    expect(sameBytes(pair)).toBeUndefined()
  })

  it('fails with what the migration would meet: a destination that cannot hold the guest; it listens again', async () => {
    const pair = makePair([64], fill)
    pair.headroom = { bytes: 64 * MiB, limitedBy: "the host's available memory (MemAvailable)" }
    const err = await preflight(pair.src, pair.srcRegions, { ...sourceOptions(pair, 'postcopy'), session: 'abad1dea' }).catch((e) => e)
    expect(err).toMatchObject({ code: 'ERR_MIGRATION_MEMORY', message: expect.stringMatching(/peer reported: the destination cannot hold this guest: it has 128\.0 KiB resident/) })
    expect(pair.events).toEqual([expect.stringMatching(/^ended:ERR_MIGRATION_MEMORY:/)])
    // its line names the migration the source named (before any 'incoming'), as a preflight that failed, not a session
    expect(pair.endedSessions).toEqual([{ id: 'abad1dea', preflight: true }])
    // a real migration refused the same way is a session that ended
    await expect(startSource(pair, { mode: 'postcopy' }).report).rejects.toMatchObject({ code: 'ERR_MIGRATION_MEMORY' })
    expect(pair.endedSessions[1]).toMatchObject({ preflight: false })
    pair.headroom = undefined
    await expect(preflight(pair.src, pair.srcRegions, { ...sourceOptions(pair, 'postcopy'), session: 'a11600d' })).resolves.toMatchObject({ destination: { streams: 1 } })
  })
})
