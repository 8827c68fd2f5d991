/**
 * A destination that cannot hold the guest refuses it before any page moves (src/memory-headroom.ts): a real memory
 * cgroup limits the receiver, real processes, the CLI. Without the check the migration would fill the cgroup: fail
 * half-way (ENOMEM placing pages) or, in post-copy, after the hand-off, with the service lost.
 */
import { afterAll, afterEach, describe, expect, it } from 'vitest'
import { freePort } from '../src/cli/proc'
import { kernelSkipReason } from './helpers/gate'
import { host, killAll, listening, page, sendAndWait, sendFailure } from './helpers/hosts'
import { makeMemCg } from './helpers/memcg'

const MiB = 1 << 20
const cg = makeMemCg(`uffdm-e2e-${process.pid}-${process.env.UFFD_MIGRATE_TRACKER ?? 'auto'}`)
const skip = kernelSkipReason() ?? (typeof cg === 'string' ? cg : undefined)
if (typeof cg === 'string') console.warn(`\n*** SKIPPING the memory check e2e test: ${cg}\n`)

afterEach(killAll)
afterAll(() => typeof cg !== 'string' && cg.remove())

describe.skipIf(skip)('the destination\'s memory check', () => {
  it('a receiver whose memory cgroup cannot hold the guest refuses it at once (post-copy: nothing handed off), and takes it once the limit is raised', async () => {
    if (typeof cg === 'string') return
    const A = host('a'), B = host('b')
    const g = `memcheck-${process.pid}`, port = await freePort(), http = await freePort(), srcHttp = await freePort()
    const dst = B.receiveInCgroup(cg.procs, g, port, http)
    await listening(dst)
    // room for 32 MiB more; the page-store's 64 MiB guest holds 56 MiB (and the check keeps 64 MiB for the service)
    cg.setLimit(cg.usage() + 32 * MiB)
    const src = A.service(g, srcHttp)
    await src.waitLine(/^READY/)
    // send --dry-run says so first, and moves nothing
    const dry = await sendAndWait(A, g, port, ['--mode', 'postcopy', '--dry-run'])
    expect(dry.code, sendFailure(dry.send, dst)).toBe(1)
    const dryJson = JSON.parse(dry.send.lines.join('\n'))
    expect(dryJson).toMatchObject({ outcome: 'failed', dryRun: true, code: 'ERR_MIGRATION_MEMORY', serviceRunsOn: 'source' })
    // the id the destination logged its failed check under
    expect(dryJson.migration).toMatch(/^[0-9a-f]{24}$/)
    expect(dry.send.stderr).toMatch(/dry run: peer reported: the destination cannot hold this guest/)
    expect(dry.send.stderr).toContain(`(migration ${dryJson.migration}: the destination's log names it`)
    await dst.waitLine(/a preflight check failed here: the destination cannot hold this guest.*\[ERR_MIGRATION_MEMORY\]; nothing moved, listening for the next source/, 10_000, 'stderr')
    const refused = await sendAndWait(A, g, port, ['--mode', 'postcopy'])
    expect(refused.code, sendFailure(refused.send, dst)).toBe(1)
    expect(refused.send.stderr).toMatch(/the destination cannot hold this guest: it has 5\d\.\d MiB resident at the source and \d+\.\d MiB can still be allocated here, limited by the memory cgroup \/uffdm-e2e-[\w-]+ \(memory\.(max|limit_in_bytes) [\d.]+ MiB\).*\[ERR_MIGRATION_MEMORY\]/)
    expect(JSON.parse(refused.send.lines.join('\n'))).toMatchObject({ outcome: 'failed', code: 'ERR_MIGRATION_MEMORY', serviceRunsOn: 'source' })
    await dst.waitLine(/a migration ended before the hand-off \(the destination cannot hold this guest.*\[ERR_MIGRATION_MEMORY\]; listening for the next source/, 10_000, 'stderr')
    expect((await page(srcHttp, 1)).ok).toBe(true) // the service runs on at its source
    expect(src.stderr).not.toMatch(/handed off/)
    cg.setLimit('none')
    // now the dry run passes: what both sides found, on stdout; the receiver logs it with the same id, and listens on
    const passed = A.cli(['send', '--guest', g, '--to', `127.0.0.1:${port}`, '--dry-run'])
    expect((await passed.exited).code, sendFailure(passed, dst)).toBe(0)
    const out = passed.lines.join('\n')
    expect(out).toMatch(/^dry run: a hybrid migration to 127\.0\.0\.1:\d+ would start now; nothing moved, the service runs on here/)
    expect(out).toMatch(/memory +5\d\.\d MiB resident here; [\d.]+ [MG]iB can be allocated there \(limited by the host's available memory \(MemAvailable\)\)/)
    const id = /migration id +([0-9a-f]{24})/.exec(out)?.[1]
    await dst.waitLine(new RegExp(`a preflight check from 127\\.0\\.0\\.1:\\d+ passed \\(migration ${id}\\): the region table matches; 5\\d\\.\\d MiB resident at the source`), 10_000, 'stderr')
    expect(src.stderr).toContain(`a preflight check to 127.0.0.1:${port} passed (migration ${id})`)
    const moved = await sendAndWait(A, g, port, ['--mode', 'postcopy'])
    expect(moved.code, sendFailure(moved.send, dst)).toBe(0)
    expect((await dst.waitLine(/^VERIFY (.*)$/, 60_000))[1]).toBe('ok pages=16384')
  }, 90_000)
})
