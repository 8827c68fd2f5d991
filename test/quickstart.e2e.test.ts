/**
 * The README's quick start, as written (examples/quickstart, the same text
 * as the README's blocks): the counter service moved to another "host" and
 * back with the CLI, in CommonJS and as an ES module; its counts and hits
 * carry on across both hops, and each side's log tells the hop. A service
 * that does nothing about failures: when its source dies in post-copy, the
 * destination's process ends with exit code 4, also when its main thread is
 * blocked for ever on a page that cannot arrive, and also when its migration
 * agent crashes (a bug) meanwhile.
 */
import { randomBytes } from 'node:crypto'
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterEach, describe, expect, it } from 'vitest'
import { childrenOf, freePort, LineProc, threadsLine } from '../src/cli/proc'
import { kernelSkipReason } from './helpers/gate'
import { getJson } from './helpers/http'
import { retry } from './helpers/wait'

const skip = kernelSkipReason()
const root = join(__dirname, '..')
const cli = join(root, 'bin', 'uffd-migrate.js')
const procs: LineProc[] = []
afterEach(() => {
  for (const p of procs.splice(0)) p.kill()
})

const hit = (port: number, slot: number) => getJson<{ slot: number; count: number; hits: number }>(port, `/?slot=${slot}`)

describe.skipIf(skip)('the README quick start', () => {
  for (const file of ['server.cjs', 'server.mjs']) {
    it(`${file}: there and back, the counts carry on`, async () => {
      const token = randomBytes(16).toString('hex')
      const server = join(root, 'examples', 'quickstart', file)
      const hosts = ['a', 'b'].map((h) => ({ ...process.env, UFFD_MIGRATE_TOKEN: token, GUEST_NAME: `qs-${process.pid}`, XDG_RUNTIME_DIR: mkdtempSync(join(tmpdir(), `qs-${h}-`)) }))
      const run = (env: NodeJS.ProcessEnv, args: string[], port: number) => {
        const p = new LineProc(process.execPath, args, { env: { ...env, PORT: String(port) } })
        procs.push(p)
        return p
      }
      let port = await freePort()
      let current = run(hosts[0], [server], port)
      for (let i = 1; i <= 3; i++) expect((await retry(() => hit(port, 7))).count).toBe(i)
      for (const [from, to] of [[0, 1], [1, 0]]) {
        const [migPort, httpPort] = [await freePort(), await freePort()]
        const next = run(hosts[to], [cli, 'receive', '--listen', `127.0.0.1:${migPort}`, '--', process.execPath, server], httpPort)
        await next.waitLine(/waiting for the incoming migration/, 30_000, 'stderr')
        // the README's dry run first: it would start, and nothing moved (the service still answers here)
        const dry = run(hosts[from], [cli, 'send', '--guest', `qs-${process.pid}`, '--to', `127.0.0.1:${migPort}`, '--dry-run'], 0)
        expect((await dry.waitExit(30_000)).code, dry.stderr).toBe(0)
        expect(dry.lines[0]).toMatch(/^dry run: a hybrid migration to 127\.0\.0\.1:\d+ would start now; nothing moved/)
        expect(current.exitCode).toBeNull()
        const send = run(hosts[from], [cli, 'send', '--guest', `qs-${process.pid}`, '--to', `127.0.0.1:${migPort}`], 0)
        expect((await send.waitExit(30_000)).code, send.stderr).toBe(0)
        expect(send.lines.join('\n')).toMatch(/^migration [0-9a-f]{24} to 127\.0\.0\.1:\d+, mode hybrid/)
        expect((await current.waitExit(30_000)).code, current.stderr).toBe(0)
        // the operator's lines on each host (the service's stderr)
        const addr = `127\\.0\\.0\\.1:${migPort}`
        expect(current.stderr).toMatch(new RegExp(`a migration to ${addr} began \\(migration [0-9a-f]{24}, mode hybrid\\)`))
        expect(current.stderr).toMatch(new RegExp(`handed off to ${addr}: the service runs there now`))
        expect(current.stderr).toMatch(new RegExp(`moved to ${addr}: settled there; downtime [\\d.]+ ms`))
        expect(next.stderr).toMatch(/a migration from 127\.0\.0\.1:\d+ began \(migration [0-9a-f]{24}(, encrypted)?\): 64\.0 MiB in 1 region\(s\)/) // (encrypted: UFFD_MIGRATE_ENCRYPT=1)
        expect(next.stderr).toMatch(/the service runs here \([\d.]+ ms after the hand-off arrived\)/)
        expect(next.stderr).toMatch(/settled: every page is here, \d+ ms after the service resumed/)
        current = next
        port = httpPort
        const r = await retry(() => hit(port, 7))
        expect(r.count).toBe(from === 0 ? 4 : 5)
        expect(r.hits).toBe(from === 0 ? 4 : 5)
      }
    }, 90_000)
  }
})

/**
 * The quick start service moved in post-copy with four slots' pages left at the source (on-demand paging only, no
 * background push): what each test then breaks, the destination must end with exit code 4, never answer wrong.
 */
async function postcopyWithPagesLeft(name: string, dstEnv: NodeJS.ProcessEnv = {}, recoveryTimeoutMs = 1500, handedOff = /the service runs here .* 4 of 16384 pages still to come/) {
  const token = randomBytes(16).toString('hex')
  const server = join(root, 'examples', 'quickstart', 'server.cjs')
  const hosts = ['a', 'b'].map((h) => ({ ...process.env, UFFD_MIGRATE_TOKEN: token, GUEST_NAME: name, XDG_RUNTIME_DIR: mkdtempSync(join(tmpdir(), `qsf-${h}-`)) }))
  const run = (env: NodeJS.ProcessEnv, args: string[], port: number) => {
    const p = new LineProc(process.execPath, args, { env: { ...env, PORT: String(port) } })
    procs.push(p)
    return p
  }
  const [srcHttp, migPort, dstHttp] = [await freePort(), await freePort(), await freePort()]
  const src = run(hosts[0], [server], srcHttp)
  // slots on pages of their own: with on-demand paging only and no background push they stay at the source
  const slots = [5000, 10000, 15000, 20000]
  for (const s of slots) expect((await retry(() => hit(srcHttp, s))).count).toBe(1)
  const dst = run({ ...hosts[1], ...dstEnv }, [cli, 'receive', '--listen', `127.0.0.1:${migPort}`, '--', process.execPath, server], dstHttp)
  await dst.waitLine(/waiting for the incoming migration/, 30_000, 'stderr')
  const send = run(hosts[0], [cli, 'send', '--guest', name, '--to', `127.0.0.1:${migPort}`, '--mode', 'postcopy', '--prepaging', 'demand', '--idle-fill-ms', '600000', '--recovery-timeout-ms', String(recoveryTimeoutMs)], 0)
  await dst.waitLine(handedOff, 30_000, 'stderr')
  return { hosts, run, src, dst, send, dstHttp, slots, migPort }
}

describe.skipIf(skip)('the quick start service when its source dies in post-copy', () => {
  for (const blocked of [false, true]) {
    it(`the destination ends with exit code 4${blocked ? ', its main thread blocked on a page that cannot arrive' : ''}`, async () => {
      const name = `qsf-${process.pid}-${blocked ? 'b' : 'u'}`
      const { hosts, run, src, dst, send, dstHttp, slots } = await postcopyWithPagesLeft(name)
      // what the destination's operator sees meanwhile
      const status = run(hosts[1], [cli, 'status', '--guest', name], 0)
      expect((await status.waitExit(10_000)).code, status.stderr).toBe(0)
      expect(status.lines.join('\n')).toMatch(/^guest .*: settling, restored; regions counts=67108864\n {2}4 page\(s\) still to come here from the source \(post-copy\)/)
      // the id of the migration still running, as both hosts' logs name it
      const id = /a migration from .* began \(migration ([0-9a-f]{24})(, encrypted)?\)/.exec(dst.stderr)?.[1]
      expect(status.lines).toContain(`  migration id ${id} (running)`)
      expect(src.stderr).toContain(`(migration ${id}, mode postcopy`)
      src.kill('SIGKILL')
      expect((await send.waitExit(30_000)).code, send.stderr).toBe(4)
      // the service answers from the pages it has; a request for a slot whose page is still at the dead source
      // blocks its only thread in a fault that nothing can resolve any more
      expect((await retry(() => hit(dstHttp, 1))).count).toBe(1)
      const answer = blocked ? hit(dstHttp, slots[0]).then(() => 'answered', () => 'no answer') : undefined
      const { code } = await dst.waitExit(30_000)
      expect(code, dst.stderr).toBe(4)
      expect(dst.stderr).toMatch(/the migration failed after the hand-off: .*did not reconnect within 1500 ms.* \[ERR_MIGRATION_CONNECTION\]/)
      if (blocked) {
        expect(dst.stderr).toMatch(/the service's main thread did not take the failure within 3000 ms .*: ending the process with exit code 4/)
        expect(await answer).toBe('no answer') // never a wrong one
      } else {
        expect(dst.stderr).toMatch(/exiting with code 4: the service cannot go on here without the pages that did not arrive/)
        expect(dst.stderr).not.toMatch(/did not take the failure/)
      }
    }, 90_000)
  }

  it('its migration agent crashes while the main thread waits on a page: a standby agent takes over, the page arrives, the migration settles', async () => {
    // the destination's agent throws once the service's only thread waits in a fault (a test hook: its wchan is the
    // userfaultfd wait); that thread cannot start anything now, so the standby takes over by itself
    const { src, dst, send, dstHttp, slots, hosts, run } = await postcopyWithPagesLeft(`qst-${process.pid}`, { UFFD_MIGRATE_FAULT_INJECT: 'agent-crash' }, 20_000)
    expect((await retry(() => hit(dstHttp, 1))).count).toBe(1)
    // the source stopped a while, so that the service's thread stays in its fault until the agent has crashed
    src.kill('SIGSTOP')
    const pid = childrenOf(dst.child.pid!)[0]
    // A slot whose page is still at the source: the service's thread waits on it. Twice in CI (about one run in 15,
    // not in 30 runs here, nor did a page ever arrive unasked in 12 runs watched with `status`) the first slot's page
    // was here already and the service answered at once, with the right count: that is said with both hosts' logs,
    // and the next slot is taken. (If the takeover line does not come: where the service's threads wait.)
    let answer: Promise<{ count: number }> | undefined, waited = -1, early = ''
    const answeredEarly: number[] = []
    for (const slot of slots.slice(1)) {
      answer = hit(dstHttp, slot)
      early = await Promise.race([
        answer.then((r) => `answered before any takeover: ${JSON.stringify(r)}`, (e: Error) => `no answer: ${e.message}`),
        dst.waitLine(/a new migration agent takes over/, 30_000, 'stderr').then(() => '', (e: Error) => `${e.message}; its threads: ${threadsLine(pid)}`),
      ])
      if (!early.startsWith('answered before any takeover')) {
        waited = slot
        break
      }
      answeredEarly.push(slot)
      console.warn(`slot ${slot}: ${early} (its page was here before the source stopped); the destination said:\n${dst.stderr}\nsend said:\n${send.stderr}`)
    }
    expect(early, `the destination said:\n${dst.stderr}\nsend said:\n${send.stderr}`).toBe('')
    expect(answeredEarly.length).toBeLessThan(2) // once may be a fluke of the machine; twice in a row is not
    src.kill('SIGCONT') // it finds the link broken and dials in again: the new agent answers
    // each slot was hit once at the source: the answers count on from there, from pages the new agent installed
    expect((await answer!).count).toBe(2)
    for (const s of slots.filter((x) => x !== waited)) expect((await hit(dstHttp, s)).count).toBe(answeredEarly.includes(s) ? 3 : 2)
    expect((await send.waitExit(60_000)).code, send.stderr).toBe(0)
    expect((await src.waitExit(30_000)).code).toBe(0) // moved
    expect(dst.stderr).toMatch(/the migration agent crashed: Error: injected by UFFD_MIGRATE_FAULT_INJECT=agent-crash/)
    expect(dst.stderr).toMatch(/a new migration agent takes over after the last one crashed: [1-4] page\(s\) still to come from 127\.0\.0\.1:\d+; listening again on port \d+ for the source/)
    expect(dst.stderr).toMatch(/the source came back after/)
    expect(dst.stderr).not.toMatch(/exiting|ending the process/)
    const status = run(hosts[1], [cli, 'status', '--guest', `qst-${process.pid}`], 0)
    expect((await status.waitExit(10_000)).code, status.stderr).toBe(0)
    expect(status.lines[0]).toMatch(/: settled/)
    expect((await hit(dstHttp, 1)).count).toBe(2)
  }, 90_000)

  it('its migration agent crashes as it asks for the restore, before a standby exists: one starts then and takes over (or the service resumes at the source): one host, never none or two', async () => {
    const name = `qsr-${process.pid}`
    const { src, dst, send, dstHttp, slots, hosts, run, migPort } = await postcopyWithPagesLeft(name, { UFFD_MIGRATE_FAULT_INJECT: 'agent-crash:restore' }, 1500, /injected by UFFD_MIGRATE_FAULT_INJECT=agent-crash:restore/)
    const first = await Promise.race([
      dst.waitLine(/a new migration agent takes over/, 30_000, 'stderr').then(() => 'takeover', () => 'no takeover line'),
      send.waitExit(30_000).then((r) => `send exited ${r.code}`),
    ])
    if (first === 'send exited 1') {
      // the service's thread heard of the crash before the restore: nothing started here, the receiver takes a new
      // agent, the source resumes its service (NO_SESSION); the watch the crashed agent armed must not end this one
      expect(send.stderr).toMatch(/the service resumed on the source\) \[ERR_MIGRATION_NO_SESSION\]/)
      expect(dst.stderr).toMatch(/a new agent listens on 127\.0\.0\.1:\d+ again \(2 of 4\)/)
      await new Promise((r) => setTimeout(r, 4000)) // past the watch's 3 s
      expect(dst.child.exitCode, dst.stderr).toBeNull()
      // and its new agent takes the next migration: the crashed one's userfaultfd (kept for a standby) is closed
      const again = run(hosts[0], [cli, 'send', '--guest', name, '--to', `127.0.0.1:${migPort}`], 0)
      expect((await again.waitExit(30_000)).code, `${again.stderr}\n${dst.stderr}`).toBe(0)
      expect((await src.waitExit(30_000)).code).toBe(0) // moved
      return
    }
    // the restore came first: the service runs here; a standby started after the crash took the will the exit watch
    // kept for it, heard the resume time from this thread, and the source came back to it
    expect(first, `${dst.stderr}\n${send.stderr}`).toBe('takeover')
    for (const s of slots) expect((await retry(() => hit(dstHttp, s))).count).toBe(2) // each page from the source, via the new agent
    expect((await send.waitExit(60_000)).code, send.stderr).toBe(0)
    expect((await src.waitExit(30_000)).code).toBe(0) // moved
    expect(dst.stderr).toMatch(/the service runs here \(a new agent heard it after the last one crashed\)/)
    expect(dst.stderr).toMatch(/the source came back after/)
    expect(dst.stderr).not.toMatch(/exiting|ending the process/)
    const status = run(hosts[1], [cli, 'status', '--guest', name], 0)
    expect((await status.waitExit(10_000)).code, status.stderr).toBe(0)
    expect(status.lines[0]).toMatch(/: settled/)
  }, 90_000)

  it('its migration agent and the standby both crash while the main thread waits on a page: the process still ends with exit code 4', async () => {
    // the source is stopped, so the page the service waits for cannot come; then the destination's agent throws
    // (a test hook: once the main thread's wchan is the userfaultfd wait), and the standby as it takes over: only the
    // native exit watch can end the process now
    const { src, dst, send, dstHttp, slots } = await postcopyWithPagesLeft(`qsc-${process.pid}`, { UFFD_MIGRATE_FAULT_INJECT: 'agent-crash+takeover' })
    // the service serves here (a slot whose page it has), then its page requests can get no answer
    expect((await retry(() => hit(dstHttp, 1))).count).toBe(1)
    src.kill('SIGSTOP')
    try {
      const answer = hit(dstHttp, slots[1]).then(() => 'answered', () => 'no answer')
      const { code } = await dst.waitExit(30_000)
      expect(code, dst.stderr).toBe(4)
      expect(dst.stderr).toMatch(/the migration agent crashed: Error: injected by UFFD_MIGRATE_FAULT_INJECT=agent-crash\n/)
      expect(dst.stderr).toMatch(/a new migration agent takes over after the last one crashed/)
      expect(dst.stderr).toMatch(/the migration agent crashed: Error: injected by UFFD_MIGRATE_FAULT_INJECT=agent-crash\+takeover \(the new agent\)/)
      expect(dst.stderr).toMatch(/the migration agent ended before every page arrived, and the service's main thread did not take the failure within 3000 ms .*: ending the process with exit code 4/)
      expect(await answer).toBe('no answer')
    } finally {
      src.kill('SIGKILL')
      send.kill()
    }
  }, 90_000)

  it('the same with JSON log lines: the exit watch\'s last line (written by its native thread) is one object too', async () => {
    const { src, dst, send, dstHttp, slots } = await postcopyWithPagesLeft(`qsj-${process.pid}`, { UFFD_MIGRATE_FAULT_INJECT: 'agent-crash+takeover', UFFD_MIGRATE_LOG_FORMAT: 'json' })
    expect((await retry(() => hit(dstHttp, 1))).count).toBe(1)
    src.kill('SIGSTOP')
    try {
      void hit(dstHttp, slots[1]).catch(() => {})
      expect((await dst.waitExit(30_000)).code, dst.stderr).toBe(4)
      // (the receive CLI's own lines are not the service's: only those that start as a JSON object)
      const lines = dst.stderr.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as Record<string, unknown>)
      expect(lines.find((l) => l.event === 'agent-crashed')).toMatchObject({ level: 'error', msg: expect.stringMatching(/^the migration agent crashed: Error: injected/) })
      const last = lines[lines.length - 1]
      expect(last).toMatchObject({ event: 'exiting', level: 'error', msg: expect.stringMatching(/the migration agent ended before every page arrived, .*: ending the process with exit code 4$/) })
      expect(last.time).toBeUndefined()
    } finally {
      src.kill('SIGKILL')
      send.kill()
    }
  }, 90_000)
})

describe.skipIf(skip)('the quick start service moved back while its old process still forwards', () => {
  it('the guest that came back takes the name: status and send reach it, also after the old process exited', async () => {
    const token = randomBytes(16).toString('hex')
    const server = join(root, 'examples', 'quickstart', 'server.cjs')
    const name = `qsb-${process.pid}`
    const hosts = ['a', 'b'].map((h) => ({ ...process.env, UFFD_MIGRATE_TOKEN: token, GUEST_NAME: name, XDG_RUNTIME_DIR: mkdtempSync(join(tmpdir(), `qsb-${h}-`)) }))
    const run = (env: NodeJS.ProcessEnv, args: string[], port: number) => {
      const p = new LineProc(process.execPath, args, { env: { ...env, PORT: String(port) } })
      procs.push(p)
      return p
    }
    const status = async (host: number) => {
      const st = run(hosts[host], [cli, 'status', '--guest', name], 0)
      expect((await st.waitExit(10_000)).code, st.stderr).toBe(0)
      return st.lines[0]
    }
    const [httpA, httpB, httpA2, migB, migA] = [await freePort(), await freePort(), await freePort(), await freePort(), await freePort()]
    const old = run(hosts[0], [server], httpA)
    expect((await retry(() => hit(httpA, 7))).count).toBe(1)
    const onB = run(hosts[1], [cli, 'receive', '--listen', `127.0.0.1:${migB}`, '--', process.execPath, server], httpB)
    await onB.waitLine(/waiting for the incoming migration/, 30_000, 'stderr')
    expect((await run(hosts[0], [cli, 'send', '--guest', name, '--to', `127.0.0.1:${migB}`], 0).waitExit(30_000)).code).toBe(0)
    // a client of the old address keeps the old process forwarding (it exits once idle for 2 s)
    let clients = true
    const client = (async () => {
      while (clients) await hit(httpA, 9).catch(() => undefined).then(() => new Promise((r) => setTimeout(r, 100)))
    })()
    const back = run(hosts[0], [cli, 'receive', '--listen', `127.0.0.1:${migA}`, '--', process.execPath, server], httpA2)
    await back.waitLine(/waiting for the incoming migration/, 30_000, 'stderr')
    expect(await status(0)).toMatch(/: listening; /)
    expect((await run(hosts[1], [cli, 'send', '--guest', name, '--to', `127.0.0.1:${migA}`], 0).waitExit(30_000)).code).toBe(0)
    expect(old.child.exitCode, 'the old process still forwards').toBeNull()
    expect(await status(0)).toMatch(/: settled, restored; /)
    clients = false
    await client
    expect((await old.waitExit(30_000)).code).toBe(0)
    // its exit did not take the name from the guest that runs here now
    expect(await status(0)).toMatch(/: settled, restored; /)
    expect((await hit(httpA2, 7)).count).toBe(2)
  }, 90_000)
})

