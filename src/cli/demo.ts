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
import { pinnedClient, type PinnedClient, type PinnedClientResult } from './pinned-client'
import { freePort, LineProc, threadsLine } from './proc'

export type { PinnedClientResult }

const root = join(__dirname, '..', '..')
const cli = join(root, 'bin', 'uffd-migrate.js')

interface Client {
  stop(): Promise<ExampleResult['client']>
}

/** How to start each example and its checking client. */
const EXAMPLES = {
  'page-store': {
    args: (o: ExampleRun) => ['--mib', String(o.sizeMiB), '--writes', String(o.writesPerSec ?? 0)],
    client: (targets: () => [string, number][], o: ExampleRun): Client =>
      require(join(root, 'examples', 'page-store', 'client.js')).hammer({ targets, pageCount: (o.sizeMiB * 1024 * 1024) / 4096 }),
  },
  'kv-store': {
    args: (o: ExampleRun) => ['--arena-mib', String(o.sizeMiB), '--keys', String(o.keys ?? 100_000)],
    client: (targets: () => [string, number][], o: ExampleRun): Client =>
      require(join(root, 'examples', 'kv-store', 'client.js')).hammer({ targets, keys: o.keys ?? 100_000 }),
  },
  'scan-service': {
    args: (o: ExampleRun) => ['--mib', String(o.sizeMiB)],
    client: undefined,
  },
} as const

export interface ExampleRun {
  /** Which service under examples/ (default page-store). */
  example?: keyof typeof EXAMPLES
  sizeMiB: number
  mode: MigrationMode
  /** page-store: page writes per second. */
  writesPerSec?: number
  /** kv-store: number of keys. */
  keys?: number
  /** Nice value of both services' migration agents (UFFD_MIGRATE_AGENT_NICE). */
  agentNice?: number
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
  /** Fail with both guests' status and output if `send` has not returned by then (tests; default: no bound). */
  sendTimeoutMs?: number
  /** Extra arguments for the page-store service on both hosts (e.g. --blocking). */
  serviceArgs?: string[]
  /**
   * page-store: the service serve()s its HTTP server, and autocannon (a
   * devDependency) hammers the source's address only, across the migration.
   */
  autocannon?: boolean
  /** The pinned client's total request rate, requests/s (default: as fast as its 4 connections go). */
  autocannonRate?: number
  /**
   * Tests: something between the source and the destination (a relay that can
   * cut the link); given the destination's migration address, returns the
   * address the source should dial instead.
   */
  relay?: (host: string, port: number) => Promise<string>
  /** More environment for the source's service only (e.g. UFFD_MIGRATE_FAULT_INJECT). */
  sourceEnv?: Record<string, string>
  /** Extra arguments for `uffd-migrate receive` (e.g. --encrypt). */
  receiveArgs?: string[]
  /** The same for the destination's. */
  destEnv?: Record<string, string>
}

export interface ExampleResult {
  ok: boolean
  /** Every line the destination's service printed. */
  destLines?: string[]
  /** Every line the source's service printed. */
  sourceLines?: string[]
  report?: MigrationReport
  error?: string
  client?: { requests: number; ok: number; wrong: number; errors: number; maxGapMs: number; wrongSamples: unknown[] }
  /** The autocannon client pinned to the source's address (ExampleRun.autocannon). */
  pinned?: PinnedClientResult
  verify?: string
  sourceExit?: number | null
  /** What each side's service wrote on stderr (the operator's log lines). */
  sourceLog?: string
  destLog?: string
}

export async function migrateExample(o: ExampleRun): Promise<ExampleResult> {
  const env = {
    ...process.env,
    UFFD_MIGRATE_TOKEN: randomBytes(24).toString('hex'),
    XDG_RUNTIME_DIR: mkdtempSync(join(tmpdir(), 'uffd-migrate-run-')),
    ...(o.agentNice !== undefined ? { UFFD_MIGRATE_AGENT_NICE: String(o.agentNice) } : {}),
  }
  const destHost = o.destHost ?? '127.0.0.1'
  const [migPort, srcHttp, dstHttp] = [await freePort(), await freePort(), await freePort()]
  // unique per run: a port can come back from freePort() while the previous run's source still lives (settling, forwarding)
  const name = `run-${process.pid}-${migPort}-${randomBytes(3).toString('hex')}`
  const example = EXAMPLES[o.example ?? 'page-store']
  const server = join(root, 'examples', o.example ?? 'page-store', 'server.js')
  const common = ['--name', name, ...example.args(o), ...(o.serviceArgs ?? []), ...(o.autocannon ? ['--serve'] : [])]
  const destCmd = [
    cli, 'receive', '--listen', `${destHost}:${migPort}`, ...(o.receiveArgs ?? []), '--', process.execPath, server, ...common, '--http', String(dstHttp),
    ...(destHost !== '127.0.0.1' ? ['--http-host', destHost] : []), '--exit-after-verify',
    // the pinned client stops when send returns; the verify (which blocks the service) comes after it
    ...(o.autocannon ? ['--verify-delay-ms', '1500'] : []),
  ]
  // each host has its own runtime directory (its control sockets), as two machines would: with a shared one the guest
  // that starts second, under the same name, is refused as already running (seen once in CI: the destination first)
  const destEnv = { ...env, XDG_RUNTIME_DIR: mkdtempSync(join(tmpdir(), 'uffd-migrate-run-')), ...o.destEnv }
  const dest = o.destNetns
    ? new LineProc('ip', ['netns', 'exec', o.destNetns, process.execPath, ...destCmd], { env: destEnv })
    : new LineProc(process.execPath, destCmd, { env: destEnv })
  const source = new LineProc(process.execPath, [server, ...common, '--http', String(srcHttp)], { env: { ...env, ...o.sourceEnv } })
  let client: Client | undefined
  let pinned: PinnedClient | undefined
  // send did not return in time: what both hosts' guests say, with the error (a hang is found from this, not rerun)
  const hung = async (err: Error, send: LineProc): Promise<never> => {
    const status = async (e: NodeJS.ProcessEnv) => {
      const st = new LineProc(process.execPath, [cli, 'status', '--guest', name], { env: e })
      await st.waitExit(5000).catch(() => st.kill())
      const pid = /\(pid (\d+)\)/.exec(st.lines.join(' '))?.[1]
      const threads = pid ? threadsLine(Number(pid)) : ''
      return `${st.lines.join(' | ')} ${st.stderr.trim()}${threads ? `\n  threads: ${threads}` : ''}`
    }
    const [src, dst] = [await status(env), await status(destEnv)]
    send.kill()
    throw new Error(`${err.message}\nsource status: ${src}\ndestination status: ${dst}\n` +
      `source stderr: ${source.stderr.slice(-1500)}\ndestination stderr: ${dest.stderr.slice(-1500)}`)
  }
  try {
    await source.waitLine(/^READY/)
    if (example.client) await source.waitLine(/^HTTP /)
    if (o.client !== false && example.client) client = example.client(() => [['127.0.0.1', srcHttp], [destHost, dstHttp]], o)
    await new Promise((r) => setTimeout(r, o.warmupMs ?? (example.client ? 1000 : 0)))
    // as an operator would: send once the destination listens (a slow or loaded host can take longer to get there
    // than send's --connect-timeout-ms of retrying a refused connection)
    await dest.waitLine(/waiting for the incoming migration/, 120_000, 'stderr')
    pinned = o.autocannon ? await pinnedClient(`http://127.0.0.1:${srcHttp}/page/1`, o.autocannonRate) : undefined
    if (pinned) await new Promise((r) => setTimeout(r, 500))
    pinned?.migrationStarts()
    const to = o.relay ? await o.relay(destHost, migPort) : `${destHost}:${migPort}`
    const send = new LineProc(process.execPath, [cli, 'send', '--guest', name, '--to', to, '--mode', o.mode, '--json', ...(o.sendArgs ?? [])], { env })
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
    const sent = await (o.sendTimeoutMs ? send.waitExit(o.sendTimeoutMs).catch((err) => hung(err, send)) : send.exited)
    if (poll) clearInterval(poll)
    const pinnedResult = await pinned?.stop()
    if (sent.code !== 0) return { ok: false, error: send.stderr.trim(), sourceLog: source.stderr, destLog: dest.stderr }
    const report = JSON.parse(send.lines.join('\n')) as MigrationReport
    const verify = (await dest.waitLine(/^VERIFY (.*)$/, 180_000))[1]
    await new Promise((r) => setTimeout(r, 200))
    const stats = await client?.stop()
    client = undefined
    const sourceExit = (await source.exited).code
    const fwd = /forwarded \d+ connection\(s\) and \d+ request\(s\), (\d+) bytes in ([\d.]+) ms of CPU/.exec(source.stderr)
    if (pinnedResult && fwd) pinnedResult.forwarder = { bytes: Number(fwd[1]), cpuMs: Number(fwd[2]) }
    const ok = verify.startsWith('ok') && (stats?.wrong ?? 0) === 0 && sourceExit === 0
    return { ok, report, client: stats, pinned: pinnedResult, verify, sourceExit, destLines: dest.lines, sourceLines: source.lines, sourceLog: source.stderr, destLog: dest.stderr }
  } finally {
    await client?.stop()
    pinned?.kill()
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
