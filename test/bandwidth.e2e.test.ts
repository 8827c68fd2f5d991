/**
 * The operator's bandwidth limits (send --max-bandwidth, --max-postcopy-bandwidth, set-bandwidth): real processes,
 * real TCP, the kernel pacing the bulk sockets. Every bound here is one that a loaded machine cannot break: a rate
 * limit only makes things slower, so a transfer is asserted to take at least as long as the limit allows; where the
 * hand-off must not wait for it, the margin is the limit's own time many times over.
 */
import { afterEach, describe, expect, it } from 'vitest'
import type { MigrationReport } from '../src/agent/report'
import { freePort } from '../src/cli/proc'
import { kernelSkipReason } from './helpers/gate'
import { killAll, page, sendAndWait, sendFailure, twoHosts } from './helpers/hosts'

const skip = kernelSkipReason()
const MiB = 1 << 20

afterEach(killAll)

/** Bytes the rounds before the pause sent: all of it passed the paced socket before the hand-off (a SYNC waits for it). */
const roundBytes = (rounds: MigrationReport['rounds']) => rounds.reduce((n, x) => n + x.bytes, 0)

describe.skipIf(skip)('bandwidth limits', () => {
  it('pre-copy rounds keep to --max-bandwidth; the hand-off does not wait for it', async () => {
    // 64 MiB, every 8th page zero, 5000 writes a second: round 0 sends 56 MiB, at 16 MiB/s at least 3.5 s; one more
    // round (--max-rounds 1), then pre-copy sends what is dirty again (tens of MiB) in the pause window, never limited
    const args = ['--mib', '64', '--writes', '5000']
    const { A, g, port, http, dst } = await twoHosts('bw-pre', { receiveArgs: args })
    const src = A.service(g, await freePort(), args)
    await src.waitLine(/^READY/)
    const limit = 16 * MiB
    const { code, report, send } = await sendAndWait(A, g, port, ['--mode', 'precopy', '--max-rounds', '1', '--max-bandwidth', '16MiB'])
    expect(code, sendFailure(send, dst)).toBe(0)
    const r = report!
    expect(r.bandwidthLimits).toEqual({ precopyBytesPerSec: limit, postcopyBytesPerSec: 0 })
    // the convergence check could only use the rate the limited rounds measured (no --switchover-bandwidth)
    expect(r.precopyStop).toBe('round-limit')
    expect(r.convergenceRate?.from).toBe('measured')
    expect(r.convergenceRate!.bytesPerSec).toBeLessThan(2 * limit)
    // pre-copy's last round is its stop-and-copy, in the pause window
    const before = r.rounds.slice(0, -1), window = r.rounds[r.rounds.length - 1]
    expect(roundBytes(before)).toBeGreaterThan(48 * MiB)
    expect(r.totalMs).toBeGreaterThan((roundBytes(before) / limit) * 1000 * 0.95) // TCP's first window may go out at once
    // the window carried what the last round left: at the limit, what the sockets' buffers (a few MiB each side) do
    // not absorb would take (window.bytes - buffers) / limit; unlimited, all of it takes a fraction of that
    const buffersBytes = 12 * MiB
    expect(window.bytes, JSON.stringify(r.rounds)).toBeGreaterThan(2 * buffersBytes)
    expect(r.downtimeMs).toBeLessThan(((window.bytes - buffersBytes) / limit) * 1000)
    expect((await dst.waitLine(/^VERIFY (.*)$/, 60_000))[1]).toBe('ok pages=16384')
    expect((await page(http, 1)).ok).toBe(true)
  }, 90_000)

  it('--switchover-bandwidth: pre-copy under a limit converges against the hand-off\'s rate, not the limit', async () => {
    // 32 MiB at 16 MiB/s, 1000 writes a second: round 1 leaves at most every page (32 MiB), which at 1 GiB/s fits
    // the 50 ms budget whatever the machine's load, and at the limited rate (16 MiB/s) would not: ~200 pages would
    const args = ['--mib', '32', '--writes', '1000']
    const { A, g, port, dst } = await twoHosts('bw-switch', { receiveArgs: args })
    const src = A.service(g, await freePort(), args)
    await src.waitLine(/^READY/)
    const sendArgs = ['--mode', 'precopy', '--max-rounds', '5', '--max-bandwidth', '16MiB', '--switchover-bandwidth', '1GiB']
    const { code, report, send } = await sendAndWait(A, g, port, sendArgs)
    expect(code, sendFailure(send, dst)).toBe(0)
    const r = report!
    expect(r.convergenceRate).toEqual({ bytesPerSec: 1 << 30, from: 'switchover-bandwidth' })
    expect(r.precopyStop).toBe('converged')
    // rounds 0 and 1, then the stop-and-copy in the pause window
    expect(r.rounds.map((x) => x.round), JSON.stringify(r.rounds)).toEqual([0, 1, 2])
    expect(r.bandwidthLimits).toEqual({ precopyBytesPerSec: 16 * MiB, postcopyBytesPerSec: 0 })
    expect(src.stderr).toMatch(/began \(migration [0-9a-f]{24}, mode precopy; bandwidth limits: pre-copy 16\.0 MiB\/s, post-copy push no limit; pre-copy converges against a switchover bandwidth of 1\.0 GiB\/s\)/)
    expect((await dst.waitLine(/^VERIFY (.*)$/, 60_000))[1]).toBe('ok pages=8192')
  }, 90_000)

  it('set-bandwidth lifts a limit while the round runs; set-bandwidth with nothing running says so', async () => {
    const { A, g, port, dst } = await twoHosts('bw-live')
    const src = A.service(g, await freePort())
    await src.waitLine(/^READY/)
    const idle = A.cli(['set-bandwidth', '--guest', g, '--max-bandwidth', '10MiB'])
    expect((await idle.exited).code).toBe(1)
    expect(idle.stderr).toMatch(/no migration is running for this guest.* \[ERR_INVALID_ARG\]/)
    // 64 MiB at 1 MiB/s would take a minute
    const send = A.cli(['send', '--guest', g, '--to', `127.0.0.1:${port}`, '--json', '--max-bandwidth', '1MiB'])
    await send.waitLine(/precopy round 0/, 30_000, 'stderr')
    const status = A.cli(['status', '--guest', g])
    expect((await status.exited).code, status.stderr).toBe(0)
    expect(status.lines.join('\n')).toMatch(/precopy round 0 \(.*\/s \(limit 1\.0 MiB\/s\)  pages left/)
    const set = A.cli(['set-bandwidth', '--guest', g, '--max-bandwidth', 'unlimited', '--max-postcopy-bandwidth', '200MiB'])
    expect((await set.exited).code, set.stderr).toBe(0)
    expect(set.lines[0]).toBe(`bandwidth of guest '${g}': pre-copy no limit, post-copy push 200.0 MiB/s`)
    // the operator's log on the source says it too
    await src.waitLine(/the migration to 127\.0\.0\.1:\d+ now runs with bandwidth limits: pre-copy no limit, post-copy push 200\.0 MiB\/s/, 10_000, 'stderr')
    expect(src.stderr).toMatch(/a migration to 127\.0\.0\.1:\d+ began \(migration [0-9a-f]{24}, mode hybrid; bandwidth limits: pre-copy 1\.0 MiB\/s, post-copy push no limit\)/)
    const { code } = await send.exited
    expect(code, sendFailure(send, dst)).toBe(0)
    const r = JSON.parse(send.lines.join('\n')) as MigrationReport
    expect(r.bandwidthLimits).toEqual({ precopyBytesPerSec: 0, postcopyBytesPerSec: 200 * MiB })
    // at 1 MiB/s the rounds alone would have taken roundBytes seconds: most went after the limit was lifted
    expect(r.totalMs).toBeLessThan((roundBytes(r.rounds) / MiB) * 1000 / 2)
    expect((await dst.waitLine(/^VERIFY (.*)$/, 60_000))[1]).toBe('ok pages=16384')
  }, 90_000)

  it('the post-copy push keeps to --max-postcopy-bandwidth; faults are answered meanwhile', async () => {
    const { A, g, port, http, dst } = await twoHosts('bw-post')
    const src = A.service(g, await freePort())
    await src.waitLine(/^READY/)
    const limit = 16 * MiB
    const { code, report, send } = await sendAndWait(A, g, port, ['--mode', 'postcopy', '--max-postcopy-bandwidth', '16MiB'])
    expect(code, sendFailure(send, dst)).toBe(0)
    const r = report!
    const pushedBytes = r.postcopy.pushedPages * r.pageSize
    expect(pushedBytes).toBeGreaterThan(32 * MiB)
    expect(r.postcopy.timeToSettledMs).toBeGreaterThan((pushedBytes / limit) * 1000 * 0.9)
    // the service wrote 2000 pages a second meanwhile: its faults went on the demand connection, not behind the push
    expect(r.postcopy.demandPages).toBeGreaterThan(0)
    expect((await dst.waitLine(/^VERIFY (.*)$/, 60_000))[1]).toBe('ok pages=16384')
    expect((await page(http, 1)).ok).toBe(true)
  }, 90_000)
})
