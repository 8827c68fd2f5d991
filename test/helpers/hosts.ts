/**
 * Two "hosts" for the e2e tier: each its own runtime directory (its own
 * control sockets), the page-store example as the service, the CLI. Every
 * process started here is killed (with its group) by killAll().
 */
import { randomBytes } from 'node:crypto'
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { MigrationReport } from '../../src/agent/report'
import { childrenOf, freePort, LineProc, threadsLine, threadsOf } from '../../src/cli/proc'
import { getJson } from './http'

const root = join(__dirname, '..', '..')
export const cli = join(root, 'bin', 'uffd-migrate.js')
export const pageStore = join(root, 'examples', 'page-store', 'server.js')
export const TOKEN = randomBytes(24).toString('hex')
const procs: LineProc[] = []

export type Host = ReturnType<typeof host>

export function host(name: string) {
  const env: NodeJS.ProcessEnv & { XDG_RUNTIME_DIR: string } = { ...process.env, UFFD_MIGRATE_TOKEN: TOKEN, XDG_RUNTIME_DIR: mkdtempSync(join(tmpdir(), `uffd-host-${name}-`)) }
  const run = (args: string[], cmd = process.execPath) => {
    const p = new LineProc(cmd, args, { env })
    procs.push(p)
    return p
  }
  const receiveArgs = (guest: string, port: number, http: number, extra: string[]) =>
    [cli, 'receive', '--listen', `127.0.0.1:${port}`, '--', process.execPath, pageStore, '--name', guest, '--mib', '64', '--writes', '2000', '--http', String(http), ...extra]
  return {
    env,
    /** The page-store as the first source. */
    service: (guest: string, http: number, extra: string[] = []) => run([pageStore, '--name', guest, '--mib', '64', '--writes', '2000', '--http', String(http), ...extra]),
    /** The page-store waiting for an incoming migration. */
    receive: (guest: string, port: number, http: number, extra: string[] = []) => run(receiveArgs(guest, port, http, extra)),
    /** The same, under a shell that sets the open-file limit first (`ulimit -n`). */
    receiveWithFileLimit: (limit: number, guest: string, port: number, http: number) =>
      run(['-c', `ulimit -n ${limit} && exec "$0" "$@"`, process.execPath, ...receiveArgs(guest, port, http, [])], '/bin/bash'),
    /** The same, in the cgroup whose cgroup.procs file this is (its service is born there). */
    receiveInCgroup: (procs: string, guest: string, port: number, http: number) =>
      run(['-c', 'echo $$ > "$1" && shift && exec "$@"', 'cgroup', procs, process.execPath, ...receiveArgs(guest, port, http, [])], '/bin/bash'),
    cli: (args: string[]) => run([cli, ...args]),
    /** Any command, killed with the rest. */
    run,
  }
}

export const page = (port: number, p: number) => getJson<{ ok: boolean; version: number }>(port, `/page/${p}`)

export async function sendAndWait(from: Host, guest: string, to: number, extra: string[] = []) {
  const send = from.cli(['send', '--guest', guest, '--to', `127.0.0.1:${to}`, '--json', ...extra])
  const { code } = await send.exited
  return { code, send, report: code === 0 ? (JSON.parse(send.lines.join('\n')) as MigrationReport) : undefined }
}

/** The message of an assertion on a send's exit code: what the send said, and the end of the destination's log. */
export function sendFailure(send: LineProc, dest: LineProc): string {
  return `${send.stderr}\n(destination: ${dest.stderr.slice(-1500)})`
}

/** Thread names (comm) of the service a `receive` process started (its child), or of a service started directly. */
export function serviceThreads(p: LineProc): string[] {
  const pid = p.child.pid!
  return threadsOf(childrenOf(pid)[0] ?? pid).map((t) => t.name)
}

/**
 * p's exit, or after ms (LineProc.waitExit) an error that also says where the
 * others stand: the stderr of each and every thread of each and of the
 * service it started (`@handle_userfault` is a thread blocked in a fault).
 * A hang then explains itself instead of timing the test out silently.
 */
export function exitedWithin(p: LineProc, ms: number, others: LineProc[] = []): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
  const describe = (q: LineProc) => {
    const pid = q.child.pid!
    const threads = [pid, ...childrenOf(pid)].map((id) => `\n  pid ${id}: ${threadsLine(id)}`).join('')
    return `--- ${q.child.spawnargs.slice(1, 4).join(' ')} (exit ${q.child.exitCode ?? q.child.signalCode ?? 'not yet'})${threads}\n${q.stderr.slice(-2000)}`
  }
  return p.waitExit(ms).catch((err: Error) => {
    throw new Error(`${err.message}\n${[p, ...others].map(describe).join('\n')}`)
  })
}

/** Waits for the page-store's READY line. */
export const ready = (p: LineProc) => p.waitLine(/^READY/)
/** Waits until a `receive` process listens for its incoming migration. */
export const listening = (p: LineProc) => p.waitLine(/waiting for the incoming migration/, 30_000, 'stderr')

/**
 * Host A (the source side) and host B with the page-store waiting for guest
 * `name-<pid>` on a fresh port (`fileLimit`: under `ulimit -n`). Resolves once it listens.
 */
export async function twoHosts(name: string, o: { receiveArgs?: string[]; fileLimit?: number; dstEnv?: NodeJS.ProcessEnv } = {}) {
  const A = host('a'), B = host('b')
  Object.assign(B.env, o.dstEnv)
  const g = `${name}-${process.pid}`
  const port = await freePort(), http = await freePort()
  const dst = o.fileLimit ? B.receiveWithFileLimit(o.fileLimit, g, port, http) : B.receive(g, port, http, o.receiveArgs)
  await listening(dst)
  return { A, B, g, port, http, dst }
}

export function killAll(): void {
  for (const p of procs.splice(0)) p.kill()
}
