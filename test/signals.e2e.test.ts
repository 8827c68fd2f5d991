/**
 * A stop signal for the source's process in post-copy (a supervisor's stop, Ctrl-C in its terminal): that process
 * holds the only copy of pages the destination's service, already running there, still lacks. Before, it ended at
 * once and the service there failed when its recovery window ran out. Now the signal waits for the migration's end:
 * the destination settles with every page, then the source ends (moved: by the exit it has then anyway, once the
 * clients it relays went idle). A second one ends it at once.
 * Real processes, real TCP (the page-store example, 64 MiB, post-copy held at 16 MiB/s: ~4 s).
 */
import { afterEach, describe, expect, it } from 'vitest'
import { freePort } from '../src/cli/proc'
import { kernelSkipReason } from './helpers/gate'
import { killAll, listening, page, sendAndWait, sendFailure, twoHosts } from './helpers/hosts'

const skip = kernelSkipReason()

afterEach(killAll)

/** serve: both serve() their HTTP servers (the source then has no 'moved' listener of its own: the guest decides how it ends). */
async function slowPostcopy(name: string, extra: string[] = [], serve = false) {
  const hosts = await twoHosts(name, serve ? { receiveArgs: ['--serve'] } : {})
  const src = hosts.A.service(hosts.g, await freePort(), serve ? ['--serve'] : [])
  await src.waitLine(/^READY/)
  const send = hosts.A.cli(['send', '--guest', hosts.g, '--to', `127.0.0.1:${hosts.port}`, '--json', '--mode', 'postcopy', '--max-postcopy-bandwidth', '16MiB', ...extra])
  await hosts.dst.waitLine(/^RESTORED/, 30_000) // the service runs there; most pages are still only at the source
  return { ...hosts, src, send }
}

describe.skipIf(skip)('a stop signal for the source in post-copy', () => {
  it('SIGTERM waits for the migration: the destination settles with every page, then the source ends as a moved guest does', async () => {
    const { http, dst, src, send } = await slowPostcopy('sigterm', [], true)
    src.kill('SIGTERM')
    expect((await send.exited).code, sendFailure(send, dst)).toBe(0)
    expect(JSON.parse(send.lines.join('\n')).pagesSentTwiceAfterHandoff).toBe(0)
    expect((await dst.waitLine(/^VERIFY (.*)$/, 60_000))[1]).toBe('ok pages=16384')
    expect((await page(http, 1)).ok).toBe(true)
    // (moved, it exits 0 once its relayed clients went idle: that exit honours the signal; a guest that would live on
    // after a move ends by the signal instead, test/unit/signal-hold.test.ts)
    expect(await src.exited).toMatchObject({ code: 0 })
    // (the words after "ends:" follow the phase this process's main thread had heard of: post-copy, or on a busy
    // machine still the hand-off, whose progress message the signal may overtake)
    expect(src.stderr).toMatch(/SIGTERM: held until the migration to 127\.0\.0\.1:\d+ ends: (the service runs there, and \d+ page\(s\) it lacks are only in this process|the service is paused for its hand-off)/)
  }, 90_000)

  it('a second signal ends it at once: the destination, its pages gone, fails', async () => {
    const { A, g, dst, src, send } = await slowPostcopy('sigtwice', ['--recovery-timeout-ms', '1000', '--max-postcopy-bandwidth', '8MiB']) // (~7 s: room for status and the pause between the signals on a busy machine)
    src.kill('SIGINT')
    await src.waitLine(/SIGINT: held until/, 10_000, 'stderr')
    // the operator who wonders why it is still there asks status
    const status = A.cli(['status', '--guest', g])
    expect((await status.exited).code).toBe(0)
    expect(status.lines.join('\n')).toMatch(/SIGINT held: this process ends once the migration does/)
    await new Promise((r) => setTimeout(r, 700)) // (one sooner than 500 ms after the first is the same request)
    src.kill('SIGTERM')
    expect(await src.exited).toMatchObject({ signal: 'SIGTERM' })
    expect(src.stderr).toMatch(/SIGTERM again: ending now; the service at 127\.0\.0\.1:\d+ fails when it needs one of the \d+ page\(s\) it lacks/)
    expect((await send.exited).code, send.stderr).toBe(4)
    expect(send.stderr).toMatch(/the guest's process ended during postcopy, after the hand-off/)
    // (the page-store's guest.settled rejects, and it exits 1)
    expect((await dst.exited).code, dst.stderr).toBe(1)
    expect(dst.stderr).toMatch(/did not reconnect within 1000 ms/)
  }, 90_000)

  it('Ctrl-C in the terminal of a receive that moves its service on: the wrapper and the service both get SIGINT, and the wrapper passes its own on: one request, held', async () => {
    // hop 1: the service moves to b (its receive wraps it there); hop 2: from b back to a, slowly, in post-copy
    const { A, B, g, port, dst: atB } = await twoHosts('sigint-group', { receiveArgs: ['--serve'] })
    const first = A.service(g, await freePort(), ['--serve'])
    await first.waitLine(/^READY/)
    expect((await sendAndWait(A, g, port)).code).toBe(0)
    const backPort = await freePort()
    const back = A.receive(g, backPort, await freePort(), ['--serve'])
    await listening(back)
    const send = B.cli(['send', '--guest', g, '--to', `127.0.0.1:${backPort}`, '--json', '--mode', 'postcopy', '--max-postcopy-bandwidth', '16MiB'])
    await back.waitLine(/^RESTORED/, 30_000)
    atB.kill('SIGINT', true) // the terminal's process group: receive and its service at once
    expect((await send.exited).code, sendFailure(send, back)).toBe(0)
    expect((await back.waitLine(/^VERIFY (.*)$/, 60_000))[1]).toBe('ok pages=16384')
    // one line: the service held one request (before: the wrapper's own SIGINT came as a second one and ended it)
    expect(atB.stderr.match(/SIGINT: held/g)).toHaveLength(1)
    expect(atB.stderr).not.toMatch(/again: ending now/)
    expect((await atB.exited).code).toBe(0) // moved: receive passes its service's 0 through
  }, 90_000)
})
