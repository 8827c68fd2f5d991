/**
 * The service's address follows the service: a third-party load client
 * (autocannon) pointed only at the source's address, across a migration in
 * each mode, sees no refused connection, no reset, no error and no non-2xx;
 * every request is counted exactly once, in memory that moved (the counter
 * service of the README quick start, which hands its server to guest.serve()).
 */
import { execFileSync } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import autocannon from 'autocannon'
import { afterEach, describe, expect, it } from 'vitest'
import { freePort, LineProc } from '../src/cli/proc'
import { createHostPair, netnsUnavailable } from '../src/testing/netns'
import { kernelSkipReason } from './helpers/gate'
import { getJson } from './helpers/http'
import { killAll, page, sendFailure, twoHosts } from './helpers/hosts'

const skip = kernelSkipReason()
const root = join(__dirname, '..')
const cli = join(root, 'bin', 'uffd-migrate.js')
const server = join(root, 'examples', 'quickstart', 'server.cjs')
const procs: LineProc[] = []
afterEach(() => {
  for (const p of procs.splice(0)) p.kill()
})

const hit = (port: number, slot: number, host?: string) => getJson<{ count: number; hits: number }>(port, `/?slot=${slot}`, host)

describe.skipIf(skip)('clients across a migration, pointed at the source only', () => {
  for (const mode of ['hybrid', 'postcopy', 'precopy'] as const) {
    it(`${mode}: autocannon sees 0 errors and 0 non-2xx, and every request counted once`, async () => {
      const token = randomBytes(16).toString('hex')
      const guest = `fwd-${process.pid}-${mode}`
      const env = (h: string, port: number) => ({ ...process.env, UFFD_MIGRATE_TOKEN: token, GUEST_NAME: guest, PORT: String(port), XDG_RUNTIME_DIR: mkdtempSync(join(tmpdir(), `fwd-${h}-`)) })
      const [srcHttp, dstHttp, migPort] = [await freePort(), await freePort(), await freePort()]
      const envA = env('a', srcHttp)
      const src = new LineProc(process.execPath, [server], { env: envA })
      const dst = new LineProc(process.execPath, [cli, 'receive', '--listen', `127.0.0.1:${migPort}`, '--', process.execPath, server], { env: env('b', dstHttp) })
      procs.push(src, dst)
      await dst.waitLine(/waiting for the incoming migration/, 30_000, 'stderr')
      for (let i = 0; i < 100; i++) {
        try {
          await hit(srcHttp, 0)
          break
        } catch {
          await new Promise((r) => setTimeout(r, 50))
        }
      }
      const load = autocannon({ url: `http://127.0.0.1:${srcHttp}/?slot=1`, connections: 8, duration: 5 })
      await new Promise((r) => setTimeout(r, 1000))
      const send = new LineProc(process.execPath, [cli, 'send', '--guest', guest, '--to', `127.0.0.1:${migPort}`, '--mode', mode, '--json'], { env: envA })
      procs.push(send)
      expect((await send.exited).code, send.stderr).toBe(0)
      // autocannon still runs (5 s): the source's process stays as its forwarder, and status says so and why
      const status = new LineProc(process.execPath, [cli, 'status', '--guest', guest], { env: envA })
      procs.push(status)
      expect((await status.exited).code, status.stderr).toBe(0)
      const said = status.lines.join('\n')
      expect(said).toMatch(/: moved; regions counts=67108864\n/)
      expect(said).toContain(`  moved to 127.0.0.1:${migPort}: the service runs there now\n`)
      const open = /forwarding this address's clients there: (\d+) open connection\(s\)(?: and \d+ held)?; so far (\d+) connection\(s\) relayed and (\d+) request\(s\) proxied, /.exec(said)
      expect(open, said).not.toBeNull()
      expect(Number(open![1])).toBeGreaterThan(0) // autocannon's connections, relayed
      expect(Number(open![2]) + Number(open![3])).toBeGreaterThanOrEqual(Number(open![1]))
      expect(said).toMatch(/this process exits once no client connection is open and none came for 2000 ms \(clients use it now\)$/m)
      const result = await load
      expect(result.errors).toBe(0)
      expect(result.timeouts).toBe(0)
      expect(result.non2xx).toBe(0)
      expect(result['2xx']).toBeGreaterThan(500)
      // the destination counted every answered request exactly once (those served before the hand-off arrived in
      // memory); beyond them only the requests in flight when autocannon stopped, at most one per connection
      const after = await hit(dstHttp, 1)
      const served = after.count - 1 // minus this request
      expect(served).toBeGreaterThanOrEqual(result['2xx'])
      expect(served).toBeLessThanOrEqual(result['2xx'] + 8)
      expect(served).toBeLessThanOrEqual(result.requests.sent)
      expect(after.hits).toBe(served + 2) // + the first probe of slot 0 and this one
      // the source lived on as a forwarder, then left once idle
      expect((await src.exited).code).toBe(0)
      const fwd = /forwarded (\d+) connection\(s\) and \d+ request\(s\), (\d+) bytes in ([\d.]+) ms of CPU \((\d+) spliced natively\), idle for 2000 ms: exiting/.exec(src.stderr)
      expect(fwd, src.stderr).not.toBeNull()
      expect(Number(fwd![2])).toBeGreaterThan(0) // it relayed client bytes, and says what that cost
      expect(Number(fwd![3])).toBeGreaterThan(0)
      // autocannon reconnects after each proxied (connection: close) reply: those connections go to the native relay
      expect(Number(fwd![1])).toBeGreaterThan(0)
      expect(Number(fwd![4])).toBe(Number(fwd![1]))
    }, 60_000)
  }
})

const noNetns = netnsUnavailable()
if (noNetns && !skip) console.warn(`\n*** SKIPPING the floating-IP test: ${noNetns}\n`)

describe.skipIf(skip || noNetns)('an address moved for good by --on-moved', () => {
  it('a service IP moves from the first host to the second with the hook; clients of that IP reach the service there', async () => {
    const pair = createHostPair(150 + (process.pid % 40))
    const serviceIp = pair.hostIp.replace(/\.1$/, '.100')
    try {
      execFileSync('ip', ['addr', 'add', `${serviceIp}/32`, 'dev', pair.hostDev])
      const token = randomBytes(16).toString('hex')
      const guest = `fip-${process.pid}`
      const port = 18000 + (process.pid % 1000) // the same service port on both hosts
      const base = { ...process.env, UFFD_MIGRATE_TOKEN: token, GUEST_NAME: guest, PORT: String(port) }
      const envA = { ...base, XDG_RUNTIME_DIR: mkdtempSync(join(tmpdir(), 'fip-a-')) }
      const envB = { ...base, XDG_RUNTIME_DIR: mkdtempSync(join(tmpdir(), 'fip-b-')) }
      const src = new LineProc(process.execPath, [server], { env: envA })
      const dst = new LineProc('ip', ['netns', 'exec', pair.ns, process.execPath, cli, 'receive', '--listen', `${pair.nsIp}:7070`, '--', process.execPath, server], { env: envB })
      procs.push(src, dst)
      await dst.waitLine(/waiting for the incoming migration/, 30_000, 'stderr')
      let first: { count: number } | undefined
      for (let i = 0; i < 100 && !first; i++) first = await hit(port, 3, serviceIp).catch(async () => void (await new Promise((r) => setTimeout(r, 50))))
      expect(first!.count).toBe(1)
      const move = `ip addr del ${serviceIp}/32 dev ${pair.hostDev} && ip netns exec ${pair.ns} ip addr add ${serviceIp}/32 dev ${pair.nsDev} && echo "moved $UFFD_MIGRATE_GUEST to $UFFD_MIGRATE_TO"`
      const send = new LineProc(process.execPath, [cli, 'send', '--guest', guest, '--to', `${pair.nsIp}:7070`, '--on-moved', move], { env: envA })
      procs.push(send)
      expect((await send.exited).code, send.stderr).toBe(0)
      expect(send.lines.join('\n')).toContain(`moved ${guest} to ${pair.nsIp}:7070`)
      // the service IP now lives in the second host's namespace, and the service answers there with its memory
      const owner = execFileSync('ip', ['netns', 'exec', pair.ns, 'ip', '-o', 'addr', 'show', 'dev', pair.nsDev]).toString()
      expect(owner).toContain(`${serviceIp}/32`)
      expect((await hit(port, 3, serviceIp)).count).toBe(2)
      expect((await src.exited).code).toBe(0)
    } finally {
      pair.cleanup()
      try {
        execFileSync('ip', ['addr', 'del', `${serviceIp}/32`, 'dev', pair.hostDev], { stdio: 'pipe' })
      } catch {
        // moved or gone with the pair
      }
    }
  }, 60_000)
})

describe.skipIf(skip)('the service on another network than the migration', () => {
  it('send --service-host: the old home relays its clients to the service where it listens, not to the migration address', async () => {
    // the receiver takes the migration on 127.0.0.1; the service there listens on 127.0.0.2 only (a migration network
    // apart from the service's): without --service-host the forwarder dialled 127.0.0.1 and its clients were refused
    const { A, g, port, http, dst } = await twoHosts('svc-host', { receiveArgs: ['--serve', '--http-host', '127.0.0.2'] })
    const srcHttp = await freePort()
    const src = A.service(g, srcHttp, ['--serve'])
    await src.waitLine(/^READY/)
    const send = A.cli(['send', '--guest', g, '--to', `127.0.0.1:${port}`, '--service-host', '127.0.0.2', '--json'])
    expect((await send.exited).code, sendFailure(send, dst)).toBe(0)
    expect((await dst.waitLine(/^VERIFY (.*)$/, 60_000))[1]).toBe('ok pages=16384')
    const there = await getJson<{ ok: boolean; version: number }>(http, '/page/1', '127.0.0.2')
    const viaOldHome = await page(srcHttp, 1)
    expect([there.ok, viaOldHome.ok]).toEqual([true, true])
    expect(viaOldHome.version).toBeGreaterThanOrEqual(there.version)
    killAll()
  }, 90_000)
})
