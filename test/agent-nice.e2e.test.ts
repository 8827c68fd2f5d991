/**
 * agentNice: the migration agent's threads run at a lower priority than the
 * service's, on both hosts, and a migration still carries every byte.
 * Checked against the kernel's own view of each thread (/proc/self/task).
 */
import { execFileSync, spawnSync } from 'node:child_process'
import { readdirSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { Guest } from '../src/guest'
import { freePort } from '../src/cli/proc'
import { kernelSkipReason } from './helpers/gate'

const skip = kernelSkipReason()
const TOKEN = 'agent-nice-tests-token-0123456789'
const MiB = 1 << 20

/**
 * tid -> { name, nice } as the scheduler has it, both from one read of /proc/<pid>/task/<tid>/stat (name in
 * parentheses, nice in field 19): a name read apart from the nice could belong to a later moment (a native
 * thread takes its priority, then its name). name: only threads of that name.
 */
function threads(name?: string): Map<number, { name: string; nice: number }> {
  const out = new Map<number, { name: string; nice: number }>()
  for (const tid of readdirSync('/proc/self/task')) {
    let stat: string
    try {
      stat = readFileSync(`/proc/self/task/${tid}/stat`, 'utf8')
    } catch {
      continue // the thread ended since readdir (a libuv or V8 helper)
    }
    const comm = stat.slice(stat.indexOf('(') + 1, stat.lastIndexOf(')'))
    if (name !== undefined && comm !== name) continue
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ') // fields from 3 on
    out.set(Number(tid), { name: comm, nice: Number(fields[19 - 3]) })
  }
  return out
}

/** tid -> nice; name: only threads of that name. */
function threadNice(name?: string): Map<number, number> {
  return new Map([...threads(name)].map(([tid, t]) => [tid, t.nice]))
}

/**
 * Every thread not in `exclude`, sampled every 2 ms until `until` settles: its latest name and the nice values
 * seen under that name (a native thread takes its priority, then its name: what it had under the name it
 * inherited is not the named thread's).
 */
async function sampleThreads(until: Promise<unknown>, exclude: Set<number>): Promise<Map<number, { name: string; nice: number[] }>> {
  const seen = new Map<number, { name: string; nice: number[] }>()
  let done = false
  void until.then(() => (done = true), () => (done = true))
  while (!done) {
    for (const [tid, t] of threads()) {
      if (exclude.has(tid)) continue
      const was = seen.get(tid)
      if (was?.name !== t.name) seen.set(tid, { name: t.name, nice: [t.nice] })
      else if (!was.nice.includes(t.nice)) was.nice.push(t.nice)
    }
    await new Promise((r) => setTimeout(r, 2))
  }
  return seen
}

describe.skipIf(skip)('agentNice', () => {
  it('runs the agents of both hosts at the given nice value, the service at its own, and migrates every byte', async () => {
    const threadsBefore = new Set(threads().keys())
    const port = await freePort()
    const destination = Guest.start({ name: `nd-${port}`, regions: { mem: 64 * MiB }, receive: `127.0.0.1:${port}`, token: TOKEN, control: false, agentNice: 7 })
    destination.catch(() => {})
    const source = await Guest.start({ name: `ns-${port}`, regions: { mem: 64 * MiB }, token: TOKEN, control: false, exitOnMoved: false, agentNice: 7 })
    const src = new Uint8Array(source.regions.mem.buffer)
    for (let i = 0; i < src.length; i += 4096) src[i] = ((i >> 12) % 251) + 1
    // postcopyNice 0: only agentNice here (the next test has post-copy's own)
    const report = source.migrate({ to: `127.0.0.1:${port}`, mode: 'postcopy', postcopyNice: 0 })
    const dest = await destination
    expect(threads().get(process.pid)?.nice).toBe(0) // the service's main thread is left alone
    // every new thread until the destination settled (each side starts its threads when it gets there: no
    // moment has them all)
    const seen = await sampleThreads(dest.settled, threadsBefore)
    const niceOf = (name: string) => [...new Set([...seen.values()].filter((t) => t.name === name).flatMap((t) => t.nice))]
    // the two agent workers, the destination's bulk reader and the source's bulk writer run at 7 (bulk work, like
    // the agents' loops they replace); by name: once in CI a thread of no name of ours was at 7 too, a helper the
    // agent's thread started
    expect(niceOf('uffdm-bulk-rx')).toEqual([7])
    expect(niceOf('uffdm-bulk-tx')).toEqual([7])
    const atSeven = [...seen.values()].filter((t) => t.nice.includes(7)).map((t) => t.name)
    expect(atSeven.filter((name) => !name.startsWith('uffdm-')).length, atSeven.join()).toBeGreaterThanOrEqual(2)
    // the native demand threads, one per side (a blocked fault waits on them): at the service's nice where the
    // kernel allows lowering it (root)
    const demandNice = process.getuid?.() === 0 ? 0 : 7
    expect(niceOf('uffdm-demand-rx')).toEqual([demandNice])
    expect(niceOf('uffdm-demand-tx')).toEqual([demandNice])
    await report
    expect(Buffer.compare(Buffer.from(dest.regions.mem.buffer), Buffer.from(src))).toBe(0)
    await dest.close()
    await source.close()
  })

  it('postcopyNice: from the hand-off the agents of both hosts yield, the threads that move pages do not, and the agents come back once it is over', async () => {
    const port = await freePort()
    const threadsBefore = new Set(threadNice().keys())
    const destination = Guest.start({ name: `pd-${port}`, regions: { mem: 64 * MiB }, receive: `127.0.0.1:${port}`, token: TOKEN, control: false })
    destination.catch(() => {})
    const source = await Guest.start({ name: `ps-${port}`, regions: { mem: 64 * MiB }, token: TOKEN, control: false, exitOnMoved: false })
    const src = new Uint8Array(source.regions.mem.buffer)
    for (let i = 0; i < src.length; i += 4096) src[i] = ((i >> 12) % 251) + 1
    const report = source.migrate({ to: `127.0.0.1:${port}`, mode: 'postcopy', postcopyNice: 12 })
    const dest = await destination
    // the kernel's view of every new thread, sampled until the destination settled
    const seen = await sampleThreads(dest.settled, threadsBefore)
    await report
    const max = (prefix: string) => Math.max(...[...seen.values()].filter((t) => t.name.startsWith(prefix)).flatMap((t) => t.nice))
    // a blocked fault waits on these (a page the push sent comes through the bulk threads): never post-copy's nice
    expect(max('uffdm-bulk-rx')).toBe(0)
    expect(max('uffdm-bulk-tx')).toBe(0)
    expect(max('uffdm-demand-rx')).toBe(0)
    expect(max('uffdm-demand-tx')).toBe(0)
    expect(threadNice().get(process.pid)).toBe(0) // the service's thread
    // both agents' threads yielded (two threads that were not there before, at 12 at some point) ...
    expect([...seen.values()].filter((t) => !t.name.startsWith('uffdm-') && t.nice.includes(12)).length).toBe(2)
    // ... and are back at their own nice once it is over (root may lower a nice value again)
    if (process.getuid?.() === 0) expect([...threads().values()].filter((t) => t.nice === 12).map((t) => t.name)).toEqual([])
    expect(Buffer.compare(Buffer.from(dest.regions.mem.buffer), Buffer.from(src))).toBe(0)
    await dest.close()
    await source.close()
  })

  it('rejects a nice value outside 0-19 with ERR_INVALID_ARG, from the option and from the environment', async () => {
    const start = (agentNice?: number) => Guest.start({ name: 'nice-bad', regions: { mem: MiB }, token: TOKEN, control: false, agentNice })
    await expect(start(20)).rejects.toMatchObject({ code: 'ERR_INVALID_ARG', message: expect.stringMatching(/options.agentNice .* 0 to 19, got 20/) })
    await expect(start(-1)).rejects.toMatchObject({ code: 'ERR_INVALID_ARG' })
    await expect(start(2.5)).rejects.toMatchObject({ code: 'ERR_INVALID_ARG' })
    process.env.UFFD_MIGRATE_AGENT_NICE = 'low'
    try {
      await expect(start()).rejects.toMatchObject({ code: 'ERR_INVALID_ARG', message: expect.stringMatching(/UFFD_MIGRATE_AGENT_NICE .* got "low"/) })
    } finally {
      delete process.env.UFFD_MIGRATE_AGENT_NICE
    }
  })

  it('uffd-migrate receive --agent-nice passes the value to the service, and refuses one outside 0-19', () => {
    const cli = join(__dirname, '..', 'dist', 'cli', 'main.js')
    const env = { ...process.env, UFFD_MIGRATE_TOKEN: TOKEN }
    const out = execFileSync(process.execPath, [cli, 'receive', '--listen', '127.0.0.1:1', '--agent-nice', '9', '--', process.execPath, '-e', 'console.log(process.env.UFFD_MIGRATE_AGENT_NICE)'], { env, encoding: 'utf8' })
    expect(out.trim()).toBe('9')
    const bad = spawnSync(process.execPath, [cli, 'receive', '--listen', '127.0.0.1:1', '--agent-nice', '25', '--', 'true'], { env, encoding: 'utf8' })
    expect(bad.status).toBe(2) // a usage error
    expect(bad.stderr).toMatch(/--agent-nice to be an integer nice value from 0 to 19, got 25/)
  })
})
