/**
 * The README's quick start, as written (examples/quickstart, the same text
 * as the README's blocks): the counter service moved to another "host" and
 * back with the CLI, in CommonJS and as an ES module; its counts and hits
 * carry on across both hops.
 */
import { randomBytes } from 'node:crypto'
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterEach, describe, expect, it } from 'vitest'
import { freePort, LineProc } from '../src/cli/proc'
import { kernelSkipReason } from './helpers/gate'
import { getJson } from './helpers/http'

const skip = kernelSkipReason()
const root = join(__dirname, '..')
const cli = join(root, 'bin', 'uffd-migrate.js')
const procs: LineProc[] = []
afterEach(() => {
  for (const p of procs.splice(0)) p.kill()
})

const hit = (port: number, slot: number) => getJson<{ slot: number; count: number; hits: number }>(port, `/?slot=${slot}`)

async function until<T>(f: () => Promise<T>, ms = 20_000): Promise<T> {
  const end = Date.now() + ms
  for (;;) {
    try {
      return await f()
    } catch (err) {
      if (Date.now() > end) throw err
      await new Promise((r) => setTimeout(r, 50))
    }
  }
}

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
      for (let i = 1; i <= 3; i++) expect((await until(() => hit(port, 7))).count).toBe(i)
      for (const [from, to] of [[0, 1], [1, 0]]) {
        const [migPort, httpPort] = [await freePort(), await freePort()]
        const next = run(hosts[to], [cli, 'receive', '--listen', `127.0.0.1:${migPort}`, '--', process.execPath, server], httpPort)
        await next.waitLine(/waiting for the incoming migration/, 30_000, 'stderr')
        const send = run(hosts[from], [cli, 'send', '--guest', `qs-${process.pid}`, '--to', `127.0.0.1:${migPort}`], 0)
        expect((await send.waitExit(30_000)).code, send.stderr).toBe(0)
        expect(send.lines.join('\n')).toMatch(/^migration to 127\.0\.0\.1:\d+, mode hybrid/)
        expect((await current.waitExit(30_000)).code, current.stderr).toBe(0)
        current = next
        port = httpPort
        const r = await until(() => hit(port, 7))
        expect(r.count).toBe(from === 0 ? 4 : 5)
        expect(r.hits).toBe(from === 0 ? 4 : 5)
      }
    }, 90_000)
  }
})
