/**
 * `uffd-migrate demo`: the whole job on one machine. Starts the page-store
 * example with a 1 GiB guest, a destination on loopback, a client hammering
 * the service, migrates with the live progress display, checks every answer
 * and every page, and prints the report. migrateExample() is the same run as
 * a function, for the end-to-end tests and the benchmark.
 */
import { randomBytes } from 'node:crypto'
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { MigrationMode, MigrationReport } from '../agent/report'
import { formatReport, progressLine } from './format'
import { freePort, LineProc } from './proc'

const root = join(__dirname, '..', '..')
const server = join(root, 'examples', 'page-store', 'server.js')
const cli = join(root, 'bin', 'uffd-migrate.js')

export interface ExampleRun {
  sizeMiB: number
  mode: MigrationMode
  writesPerSec: number
  /** Run the destination in this network namespace, reachable at destHost. */
  destNetns?: string
  destHost?: string
  /** Extra arguments for `uffd-migrate send`. */
  sendArgs?: string[]
  /** Time the client hammers the source before the migration starts. */
  warmupMs?: number
  progress?: (line: string) => void
  /** Hammer the service with a checking client (default true). */
  client?: boolean
  /** Extra arguments for the page-store service on both hosts (e.g. --blocking). */
  serviceArgs?: string[]
}

export interface ExampleResult {
  ok: boolean
  report?: MigrationReport
  error?: string
  client?: { requests: number; ok: number; wrong: number; errors: number; maxGapMs: number; wrongSamples: unknown[] }
  verify?: string
  sourceExit?: number | null
}

export async function migrateExample(o: ExampleRun): Promise<ExampleResult> {
  const env = {
    ...process.env,
    UFFD_MIGRATE_TOKEN: randomBytes(24).toString('hex'),
    XDG_RUNTIME_DIR: mkdtempSync(join(tmpdir(), 'uffd-migrate-run-')),
  }
  const destHost = o.destHost ?? '127.0.0.1'
  const [migPort, srcHttp, dstHttp] = [await freePort(), await freePort(), await freePort()]
  const name = `run-${process.pid}-${migPort}`
  const common = ['--name', name, '--mib', String(o.sizeMiB), '--writes', String(o.writesPerSec), ...(o.serviceArgs ?? [])]
  const destCmd = [cli, 'receive', '--listen', `${destHost}:${migPort}`, '--', process.execPath, server, ...common, '--http', String(dstHttp), '--http-host', destHost, '--exit-after-verify']
  const dest = o.destNetns
    ? new LineProc('ip', ['netns', 'exec', o.destNetns, process.execPath, ...destCmd], { env })
    : new LineProc(process.execPath, destCmd, { env })
  const source = new LineProc(process.execPath, [server, ...common, '--http', String(srcHttp)], { env })
  const { hammer } = require(join(root, 'examples', 'page-store', 'client.js'))
  let client: { stop(): Promise<ExampleResult['client']> } | undefined
  try {
    await source.waitLine(/^READY/)
    await source.waitLine(/^HTTP /)
    if (o.client !== false) {
      client = hammer({ targets: () => [['127.0.0.1', srcHttp], [destHost, dstHttp]], pageCount: (o.sizeMiB * 1024 * 1024) / 4096 })
    }
    await new Promise((r) => setTimeout(r, o.warmupMs ?? 1000))
    const send = new LineProc(process.execPath, [cli, 'send', '--guest', name, '--to', `${destHost}:${migPort}`, '--mode', o.mode, '--json', ...(o.sendArgs ?? [])], { env })
    const poll = o.progress && setInterval(async () => {
      const st = new LineProc(process.execPath, [cli, 'status', '--guest', name, '--json'], { env })
      if ((await st.exited).code !== 0) return
      try {
        const s = JSON.parse(st.lines.join('\n'))
        if (s.progress) o.progress!(progressLine(s.progress))
      } catch {
        // status raced with the exit of the source
      }
    }, 250)
    const sent = await send.exited
    if (poll) clearInterval(poll)
    if (sent.code !== 0) return { ok: false, error: send.stderr.trim() }
    const report = JSON.parse(send.lines.join('\n')) as MigrationReport
    const verify = (await dest.waitLine(/^VERIFY (.*)$/, 180_000))[1]
    await new Promise((r) => setTimeout(r, 200))
    const stats = await client?.stop()
    client = undefined
    const sourceExit = (await source.exited).code
    const ok = verify.startsWith('ok') && (stats?.wrong ?? 0) === 0 && sourceExit === 0
    return { ok, report, client: stats, verify, sourceExit }
  } finally {
    await client?.stop()
    source.kill()
    dest.kill()
  }
}

export async function runDemo(o: { sizeMiB: number; mode: MigrationMode; json: boolean }): Promise<number> {
  const say = (s: string) => process.stderr.write(s + '\n')
  const tty = process.stderr.isTTY
  say(`demo: page-store example with a ${o.sizeMiB} MiB guest, 10000 page writes/s, a client checking every answer; mode ${o.mode} over loopback`)
  const r = await migrateExample({
    sizeMiB: o.sizeMiB, mode: o.mode, writesPerSec: 10_000,
    progress: (line) => process.stderr.write(tty ? `\r\x1b[2K${line}` : `${line}\n`),
  })
  if (tty) process.stderr.write('\r\x1b[2K')
  if (!r.report) {
    say(`demo: migration failed: ${r.error}`)
    return 1
  }
  if (o.json) process.stdout.write(JSON.stringify(r, null, 2) + '\n')
  else {
    process.stdout.write(formatReport(r.report) + '\n')
    const c = r.client!
    process.stdout.write(`client: ${c.requests} requests, ${c.ok} good answers, ${c.wrong} wrong, longest gap between answers ${c.maxGapMs.toFixed(1)} ms\n`)
    process.stdout.write(`destination: VERIFY ${r.verify}; source process exited with code ${r.sourceExit}\n`)
  }
  say(r.ok ? 'demo: OK: every answer and every page checked' : 'demo: FAILED')
  return r.ok ? 0 : 1
}
