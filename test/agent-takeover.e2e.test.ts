/**
 * The source's agent crashes (a bug, injected) while a migration has the service paused. Nobody on the source knows
 * then whether HANDOFF reached the destination; a new agent dials in with the migration's session (RECOVER) and the
 * destination's answer decides: post-copy goes on (the service runs there), or the service resumes here (it never got
 * HANDOFF). Before, the service stayed paused at the source for ever, or died with exit code 4 while the
 * destination, missing pages, failed after its recovery timeout: the service was lost on both hosts.
 * Clients pointed at the source's address (autocannon) see no error across it. Real processes, real TCP; the crash
 * points are UFFD_MIGRATE_FAULT_INJECT=agent-crash:postcopy / agent-crash:paused (read by the source's first agent only;
 * agent-crash:paused+takeover crashes the new one too).
 */
import { afterEach, describe, expect, it } from 'vitest'
import { readdirSync, readlinkSync } from 'node:fs'
import { join } from 'node:path'
import { childrenOf, freePort } from '../src/cli/proc'
import { kernelSkipReason } from './helpers/gate'
import { cli, host, killAll, page, sendAndWait, sendFailure, twoHosts } from './helpers/hosts'
import { retry } from './helpers/wait'
import { migrateExample } from '../src/cli/demo'

const skip = kernelSkipReason()
const touchAtResume = join(__dirname, 'fixtures', 'touch-at-resume.cjs')

afterEach(killAll)

/** Two hosts (the destination with dstEnv), and the source's page-store running with srcInject (none: ''). */
async function migrationSetup(name: string, srcInject: string, dstEnv: NodeJS.ProcessEnv = {}) {
  const hosts = await twoHosts(name, { dstEnv })
  Object.assign(hosts.A.env, { UFFD_MIGRATE_FAULT_INJECT: srcInject })
  const srcHttp = await freePort()
  const src = hosts.A.service(hosts.g, srcHttp)
  await src.waitLine(/^READY/)
  return { ...hosts, src, srcHttp }
}

/** `uffd-migrate status --json` of the guest on that host (it must answer). */
async function statusOf(on: ReturnType<typeof host>, g: string): Promise<Record<string, unknown>> {
  const status = on.cli(['status', '--guest', g, '--json'])
  expect((await status.exited).code, status.stderr).toBe(0)
  return JSON.parse(status.lines.join('\n')) as Record<string, unknown>
}

describe.skipIf(skip)('a new agent takes over', () => {
  it('the agent crashes once SETTLED came, before its report: the new one dials in, the settled destination still listens and tells it again', async () => {
    // the crashed agent's connections closed cleanly after SETTLED, as a source that hung up after the report: the
    // destination closed its listener then, and the new agent met ECONNREFUSED until send exited 4 (found by the soak)
    const { A, g, port, http, dst, src } = await migrationSetup('takeover-settled', 'agent-crash:settled')
    const { code, report, send } = await sendAndWait(A, g, port, ['--mode', 'postcopy'])
    expect(code, sendFailure(send, dst)).toBe(0)
    expect(report!.takeover).toMatchObject({ message: 'injected by UFFD_MIGRATE_FAULT_INJECT=agent-crash:settled' })
    expect(src.stderr).toMatch(/a new migration agent takes over the migration to 127\.0\.0\.1:\d+/)
    expect(dst.stderr).not.toMatch(/the source came back after/) // (settled: nothing to go on with, only the report again)
    expect((await dst.waitLine(/^VERIFY (.*)$/, 60_000))[1]).toBe('ok pages=16384')
    expect((await page(http, 1)).ok).toBe(true)
    expect((await src.exited).code).toBe(0) // moved
  }, 90_000)

  it('the agent crashes in post-copy: a new one recovers the link, every page arrives, the service moved', async () => {
    const { A, g, port, http, dst, src } = await migrationSetup('takeover-post', 'agent-crash:postcopy')
    // a slow push (64 MiB at 16 MiB/s: 4 s) so that the crash comes with most pages still here
    const { code, report, send } = await sendAndWait(A, g, port, ['--mode', 'postcopy', '--max-postcopy-bandwidth', '16MiB'])
    expect(code, sendFailure(send, dst)).toBe(0)
    const r = report!
    expect(r.takeover).toEqual({ crashedInPhase: 'postcopy', message: 'injected by UFFD_MIGRATE_FAULT_INJECT=agent-crash:postcopy' })
    expect(r.precopyStop).toBe('unknown (agent restarted)')
    // the new agent pushed what the destination lacked when it came back, and the destination received nothing twice
    expect(r.postcopy.pushedPages).toBeGreaterThan(1000)
    expect(r.pagesSentTwiceAfterHandoff).toBe(0)
    expect(r.downtimeMs).toBeGreaterThan(0)
    expect(src.stderr).toMatch(/migration agent crashed: injected by UFFD_MIGRATE_FAULT_INJECT=agent-crash:postcopy; the service stays paused while a new agent asks 127\.0\.0\.1:\d+ whether the hand-off arrived/)
    expect(src.stderr).toMatch(/a new migration agent takes over the migration to 127\.0\.0\.1:\d+ \(the last one crashed in phase postcopy/)
    expect(dst.stderr).toMatch(/the source came back after/)
    expect((await dst.waitLine(/^VERIFY (.*)$/, 60_000))[1]).toBe('ok pages=16384')
    expect((await page(http, 1)).ok).toBe(true)
    expect((await src.exited).code).toBe(0) // moved
  }, 90_000)

  it('the agent crashes as the service paused, before HANDOFF left: the service resumes here (recovery off or not), and moves on the next try', async () => {
    const { A, g, port, http, dst, src, srcHttp } = await migrationSetup('takeover-paused', 'agent-crash:paused')
    // recovery turned off: the new agent asks all the same (else the service would run nowhere)
    const first = await sendAndWait(A, g, port, ['--recovery-timeout-ms', '0'])
    expect(first.code, first.send.stderr).toBe(1)
    expect(first.send.stderr).toMatch(/hand-off never arrived.*\(the service resumed on the source\)/)
    expect(src.stderr).toMatch(/a new migration agent takes over .* \(the last one crashed in phase handoff/)
    // it serves here again, and its memory moves with the new agent
    expect((await retry(() => page(srcHttp, 1), 10_000)).ok).toBe(true) // (its resume() listens again)
    const status = A.cli(['status', '--guest', g])
    expect((await status.exited).code, status.stderr).toBe(0)
    const second = await sendAndWait(A, g, port)
    expect(second.code, sendFailure(second.send, dst)).toBe(0)
    expect(second.report!.takeover).toBeUndefined()
    expect((await dst.waitLine(/^VERIFY (.*)$/, 60_000))[1]).toBe('ok pages=16384')
    expect((await page(http, 1)).ok).toBe(true)
  }, 90_000)

  it('the new agent crashes too: the service stays paused, and the error says where it may run', async () => {
    const { A, g, port, dst, src } = await migrationSetup('takeover-twice', 'agent-crash:paused+takeover')
    const { code, send } = await sendAndWait(A, g, port)
    expect(code).toBe(4) // as when the source's process ends in the hand-off: look there before starting it again
    expect(JSON.parse(send.lines.join('\n'))).toMatchObject({ outcome: 'failed', code: 'ERR_AGENT', exitCode: 4, serviceRunsOn: 'unknown' })
    const why = /migration agent crashed: injected by UFFD_MIGRATE_FAULT_INJECT=agent-crash:paused\+takeover \(the new agent\); no migration can start from this process now: the service stays paused here: it may run on 127\.0\.0\.1:\d+ now/
    expect(send.stderr).toMatch(why)
    const st = (await statusOf(A, g)) as { phase: string; lastError?: { code: string; message: string } }
    expect(st.phase).toBe('failed')
    expect(st.lastError?.code).toBe('ERR_AGENT')
    expect(st.lastError?.message).toMatch(why)
    // the process lives on (paused), and the destination, which never got HANDOFF, listens again
    expect(src.child.exitCode).toBeNull()
    expect(dst.stderr).toMatch(/a migration ended before the hand-off/)
  }, 90_000)

  it("the destination's agent crashes in post-copy: the standby takes over, the source comes back to it, every page arrives", async () => {
    const { A, B, g, port, http, dst, src } = await migrationSetup('takeover-dst', '', { UFFD_MIGRATE_FAULT_INJECT: 'agent-crash:postcopy' })
    // a slow push (64 MiB at 16 MiB/s: 4 s): the crash, 200 ms after the service resumed there, comes with most pages still to come
    const { code, report, send } = await sendAndWait(A, g, port, ['--mode', 'postcopy', '--max-postcopy-bandwidth', '16MiB'])
    expect(code, sendFailure(send, dst)).toBe(0)
    const r = report!
    expect(r.takeover).toBeUndefined() // (the source's agent did not crash)
    expect(r.postcopy.pushedPages).toBeGreaterThan(1000)
    expect(dst.stderr).toMatch(/the migration agent crashed: Error: injected by UFFD_MIGRATE_FAULT_INJECT=agent-crash:postcopy/)
    const [, left] = /a new migration agent takes over after the last one crashed: (\d+) page\(s\) still to come from 127\.0\.0\.1:\d+; listening again on port (\d+)/.exec(dst.stderr) ?? []
    expect(Number(left)).toBeGreaterThan(1000)
    expect(src.stderr).toMatch(/the link to 127\.0\.0\.1:\d+ broke after the hand-off/)
    expect(dst.stderr).toMatch(/the source came back after \d+ ms/)
    expect((await dst.waitLine(/^VERIFY (.*)$/, 60_000))[1]).toBe('ok pages=16384')
    expect((await page(http, 1)).ok).toBe(true)
    expect((await src.exited).code).toBe(0) // moved
    expect(await statusOf(B, g)).toMatchObject({ phase: 'settled' })
    const pid = childrenOf(dst.child.pid!)[0]
    // settled: the descriptor the crashed agent held, which the standby adopted, is closed (the regions unregistered)
    expect(readdirSync(`/proc/${pid}/fd`).map((f) => readlinkSync(`/proc/${pid}/fd/${f}`)).filter((t) => t.includes('userfaultfd'))).toEqual([])
  }, 90_000)

  it("the destination's agent crashes while the service's thread blocked in a fault as it resumed, before it could start anything: the standby started with the receiver takes over", async () => {
    // the fixture reads a page still at the source synchronously at its resume; the source answers no page request
    // for 3 s (demand-stall); the destination's agent crashes once the service's thread waits in that fault
    const A = host('a'), B = host('b')
    const g = `touch-${process.pid}`, port = await freePort()
    Object.assign(A.env, { GUEST_NAME: g, UFFD_MIGRATE_FAULT_INJECT: 'demand-stall' })
    Object.assign(B.env, { GUEST_NAME: g, CONTROL: '0', UFFD_MIGRATE_FAULT_INJECT: 'agent-crash' })
    const src = A.run([touchAtResume])
    await src.waitLine(/^READY/)
    const dst = B.run([cli, 'receive', '--listen', `127.0.0.1:${port}`, '--', process.execPath, touchAtResume])
    await dst.waitLine(/waiting for the incoming migration/, 30_000, 'stderr')
    const { code, send } = await sendAndWait(A, g, port, ['--mode', 'postcopy', '--prepaging', 'demand', '--idle-fill-ms', '600000'])
    expect(code, sendFailure(send, dst)).toBe(0)
    expect((await dst.waitLine(/^READ (\d+)$/, 30_000))[1]).toBe('7')
    await dst.waitLine(/^SETTLED$/, 30_000)
    expect(dst.stderr).toMatch(/the migration agent crashed: Error: injected by UFFD_MIGRATE_FAULT_INJECT=agent-crash/)
    expect(dst.stderr).toMatch(/a new migration agent takes over after the last one crashed: 1 page\(s\) still to come/)
    expect(dst.stderr).not.toMatch(/exiting|ending the process/)
    expect((await src.exited).code).toBe(0) // moved
  }, 90_000)

  it("the destination's agent crashes as it asks for the restore with every page already there (pre-copy): a standby takes over and it settles, or the service resumes at the source: one host, never none or two", async () => {
    // found by `npm run soak` with this injection: with no page left at the hand-off no standby was armed, so the
    // service failed there (exit 4) while the source, handed off, gave up after its recovery timeout: on neither host
    for (let attempt = 1; attempt <= 4; attempt++) {
      const { A, B, g, port, http, dst, src, srcHttp } = await migrationSetup(`restore-full-${attempt}`, '', { UFFD_MIGRATE_FAULT_INJECT: 'agent-crash:restore' })
      const { code, send } = await sendAndWait(A, g, port, ['--mode', 'precopy', '--recovery-timeout-ms', '20000'])
      expect(dst.stderr).toMatch(/the migration agent crashed: Error: injected by UFFD_MIGRATE_FAULT_INJECT=agent-crash:restore/)
      if (code === 1) {
        // the crash came before this thread took the restore: nothing started there, the service runs on here
        expect(send.stderr).toMatch(/the service resumed on the source\) \[ERR_MIGRATION_NO_SESSION\]/)
        expect((await page(srcHttp, 1)).ok).toBe(true)
        // the receiver listens again with a new agent, and the next send moves the service (the crashed agent's
        // userfaultfd, kept for a standby, once made its UFFDIO_REGISTER fail with EBUSY: found by the soak)
        const again = await sendAndWait(A, g, port, ['--mode', 'precopy'])
        expect(again.code, sendFailure(again.send, dst)).toBe(0)
        expect((await dst.waitLine(/^VERIFY (.*)$/, 60_000))[1]).toBe('ok pages=16384')
        expect((await src.exited).code).toBe(0) // moved
        if (attempt === 4) return console.warn('the crash came before the restore in 4 attempts of 4: the takeover branch was not reached this time')
        killAll()
        continue
      }
      // the restore came first: the service runs there; the standby took over, the source came back to it, settled
      expect(code, sendFailure(send, dst)).toBe(0)
      expect(dst.stderr).toMatch(/a new migration agent takes over after the last one crashed: 0 page\(s\) still to come/)
      expect(dst.stderr).not.toMatch(/exiting|ending the process/)
      expect((await dst.waitLine(/^VERIFY (.*)$/, 60_000))[1]).toBe('ok pages=16384')
      expect((await page(http, 1)).ok).toBe(true)
      expect((await src.exited).code).toBe(0) // moved
      expect(await statusOf(B, g)).toMatchObject({ phase: 'settled' })
      return
    }
  }, 240_000)

  it("the destination's agent crashes with its will armed, before it asks for the restore: the service resumes at the source, and the receiver's new agent takes the next migration", async () => {
    // the crashed agent's userfaultfd, kept for a standby that never came, once kept the regions registered: the
    // next agent's UFFDIO_REGISTER failed with EBUSY and the receiver refused every source after it (found by the soak)
    const { A, g, port, http, dst, src, srcHttp } = await migrationSetup('armed', '', { UFFD_MIGRATE_FAULT_INJECT: 'agent-crash:armed' })
    const first = await sendAndWait(A, g, port, ['--mode', 'precopy'])
    expect(first.code, sendFailure(first.send, dst)).toBe(1)
    expect(first.send.stderr).toMatch(/the service resumed on the source\) \[ERR_MIGRATION_NO_SESSION\]/)
    expect(dst.stderr).toMatch(/migration agent crashed before the hand-off: injected by UFFD_MIGRATE_FAULT_INJECT=agent-crash:armed; .*a new agent listens on 127\.0\.0\.1:\d+ again \(2 of 4\)/)
    expect((await page(srcHttp, 1)).ok).toBe(true) // it runs on at the source
    const second = await sendAndWait(A, g, port, ['--mode', 'precopy'])
    expect(second.code, sendFailure(second.send, dst)).toBe(0)
    expect((await dst.waitLine(/^VERIFY (.*)$/, 60_000))[1]).toBe('ok pages=16384')
    expect((await page(http, 1)).ok).toBe(true)
    expect((await src.exited).code).toBe(0) // moved
  }, 90_000)

  it("the source's agent crashes in pre-copy, with the service running: that migration fails, a new agent moves it on the next try", async () => {
    const { A, g, port, http, dst, src, srcHttp } = await migrationSetup('restart-src', 'agent-crash:precopy')
    const first = await sendAndWait(A, g, port)
    expect(first.code, first.send.stderr).toBe(1)
    expect(JSON.parse(first.send.lines.join('\n'))).toMatchObject({ outcome: 'failed', code: 'ERR_AGENT', serviceRunsOn: 'source' })
    expect(src.stderr).toMatch(/migration agent crashed: injected by UFFD_MIGRATE_FAULT_INJECT=agent-crash:precopy; a new agent takes its place \(the service runs on here, and can move again\)/)
    expect((await page(srcHttp, 1)).ok).toBe(true) // it never stopped serving
    expect(await statusOf(A, g)).toMatchObject({ phase: 'idle', lastError: { code: 'ERR_AGENT' } })
    const second = await sendAndWait(A, g, port)
    expect(second.code, sendFailure(second.send, dst)).toBe(0)
    expect((await dst.waitLine(/^VERIFY (.*)$/, 60_000))[1]).toBe('ok pages=16384')
    expect((await page(http, 1)).ok).toBe(true)
    expect((await src.exited).code).toBe(0) // moved
  }, 90_000)

  it("the receiver's agent crashes in pre-copy: the source runs on, the receiver listens again with empty regions, and the next send moves the service", async () => {
    const { A, B, g, port, http, dst, srcHttp } = await migrationSetup('takeover-pre', '', { UFFD_MIGRATE_FAULT_INJECT: 'agent-crash:precopy' })
    // slow rounds (64 MiB at 32 MiB/s): the crash, 100 ms into the session, comes half-way through round 0
    const first = await sendAndWait(A, g, port, ['--max-bandwidth', '32MiB'])
    expect(first.code, first.send.stderr).toBe(1)
    expect(JSON.parse(first.send.lines.join('\n'))).toMatchObject({ outcome: 'failed', code: 'ERR_MIGRATION_CONNECTION', exitCode: 1, serviceRunsOn: 'source' })
    expect((await page(srcHttp, 1)).ok).toBe(true) // it serves at the source, as it did
    await dst.waitLine(/migration agent crashed before the hand-off: injected by UFFD_MIGRATE_FAULT_INJECT=agent-crash:precopy; the service runs on at the source; the regions are emptied and a new agent listens on 127\.0\.0\.1:\d+ again \(2 of 4\)/, 30_000, 'stderr')
    await dst.waitLine(/waiting for the incoming migration on/, 30_000, 'stderr') // (its second time)
    expect(await statusOf(B, g)).toMatchObject({ phase: 'listening' })
    const second = await sendAndWait(A, g, port)
    expect(second.code, sendFailure(second.send, dst)).toBe(0)
    // every page as the source had it: nothing of the first session's round 0 was left in the regions
    expect((await dst.waitLine(/^VERIFY (.*)$/, 60_000))[1]).toBe('ok pages=16384')
    expect((await page(http, 1)).ok).toBe(true)
  }, 90_000)

  it('clients pointed at the source (autocannon, through its forwarder) see no error across the crash in post-copy', async () => {
    const r = await migrateExample({
      example: 'page-store', sizeMiB: 64, mode: 'postcopy', autocannon: true, client: false, serviceArgs: ['--blocking'],
      sendArgs: ['--max-postcopy-bandwidth', '16MiB'], sourceEnv: { UFFD_MIGRATE_FAULT_INJECT: 'agent-crash:postcopy' },
    })
    expect(r.error).toBeUndefined()
    expect(r.report?.takeover?.crashedInPhase).toBe('postcopy')
    expect(r.verify).toBe('ok pages=16384')
    const p = r.pinned!
    expect(p.requests2xx).toBeGreaterThan(100)
    expect([p.errors, p.timeouts, p.non2xx]).toEqual([0, 0, 0])
    expect(p.forwarder?.bytes).toBeGreaterThan(0) // they reached the destination's service through the source
  }, 90_000)
})
