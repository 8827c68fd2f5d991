/**
 * The destination's host dies in post-copy (SIGKILL of its receiver and service, as a power loss would): its service
 * ran there on pages only the source held. With `send --on-destination-lost resume` the source, once the
 * destination's own recovery window would have ended that service, resumes its own with its state as of the
 * hand-off: it answers its clients again, every page as it was, and moves on the next send. QEMU and CRIU lose the
 * guest here. The default (fail: exit 4) is test/hops.e2e.test.ts's "a source whose destination dies in post-copy".
 * Real processes, real TCP (the page-store example, 64 MiB, post-copy held at 16 MiB/s).
 */
import { afterEach, describe, expect, it } from 'vitest'
import { freePort } from '../src/cli/proc'
import { kernelSkipReason } from './helpers/gate'
import { killAll, listening, page, sendAndWait, sendFailure, twoHosts } from './helpers/hosts'

const skip = kernelSkipReason()

afterEach(killAll)

describe.skipIf(skip)('the destination lost in post-copy', () => {
  it('--on-destination-lost resume: the service resumes at the source, answers with every page as it was, and moves on the next send', async () => {
    const { A, B, g, port, dst } = await twoHosts('lost')
    const srcHttp = await freePort()
    const src = A.service(g, srcHttp)
    await src.waitLine(/^READY/)
    const send = A.cli(['send', '--guest', g, '--to', `127.0.0.1:${port}`, '--json', '--mode', 'postcopy', '--max-postcopy-bandwidth', '16MiB',
      '--recovery-timeout-ms', '500', '--link-timeout-ms', '1000', '--on-destination-lost', 'resume'])
    await dst.waitLine(/^RESTORED/, 30_000)
    dst.kill('SIGKILL') // the receiver and its service, with most pages still only at the source
    expect((await send.exited).code, send.stderr).toBe(1)
    expect(JSON.parse(send.lines.join('\n'))).toMatchObject({ outcome: 'failed', code: 'ERR_MIGRATION_CONNECTION', exitCode: 1, serviceRunsOn: 'source' })
    expect(send.stderr).toMatch(/the destination was lost after the hand-off: the service resumed on the source with its state as of the hand-off/)
    // the service runs here again: its pages answer as it left them, and it keeps writing
    for (const p of [0, 1, 5000, 16383]) expect((await page(srcHttp, p)).ok).toBe(true)
    expect(src.child.exitCode).toBeNull()
    // and it moves on the next try
    const again = await freePort()
    const dst2 = B.receive(g, again, await freePort())
    await listening(dst2)
    const { code } = await sendAndWait(A, g, again)
    expect(code, sendFailure(send, dst2)).toBe(0)
    expect((await dst2.waitLine(/^VERIFY (.*)$/, 60_000))[1]).toBe('ok pages=16384')
  }, 90_000)
})
