// The sync-wp tracker's fault thread runs in SCHED_IDLE (so that the writer it wakes stays on its CPU), and a guard
// thread moves it back to the normal class when other work on that CPU starves it (native/wp_tracker.cc).
// Each case runs in a child process confined to one CPU (taskset): the writer, the fault thread, its guard and,
// in the second case, a busy worker thread all share it, the way a busy host shares the writer's CPU.
import { execFileSync, spawnSync } from 'node:child_process'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { loadBinding } from '../src/binding'
import { kernelSkipReason } from './helpers/gate'

const skip = kernelSkipReason()
const dist = join(__dirname, '..', 'dist')

/** taskset (util-linux) confines each case's child to one CPU. */
const hasTaskset = () => spawnSync('taskset', ['-V']).status === 0

/** Why the idle-class cases cannot run here (they confine a child to one CPU, and need the class to be usable). */
function idleClassSkipReason(): string | undefined {
  if (!hasTaskset()) return 'no taskset (util-linux) to confine a child to one CPU'
  if (!loadBinding().syncWpIdleClass?.()) return 'this process may not take a thread out of SCHED_IDLE again (no CAP_SYS_NICE, RLIMIT_NICE 0): the fault thread stays in the normal class here'
  return undefined
}

interface ChildResult {
  /** binding.syncWpIdleClass(): the process may take a thread out of SCHED_IDLE again. */
  allowed: boolean
  /** Scheduling policy of each thread named uffdm-wp* right after the tracker started (/proc: 0 normal, 5 idle). */
  policies: Record<string, number>
  /** Voluntary context switches of uffdm-wp-guard during a second without writes (-1: no guard). */
  guardWakeupsIdleSecond: number
  writes: number
  reported: number
  starved: number
  idleClass: boolean
  faults: number
}

/** Runs a tracker in a child on CPU 0; hog: a busy worker thread shares that CPU while the child writes pages. */
function runChild(opts: { idleClass: boolean; hog: boolean; noSysNice?: boolean }): ChildResult {
  const script = `
    const { readdirSync, readFileSync } = require('node:fs')
    const { Worker } = require('node:worker_threads')
    const { loadBinding } = require(${JSON.stringify(join(dist, 'binding.js'))})
    const { Region } = require(${JSON.stringify(join(dist, 'region.js'))})
    const b = loadBinding(), ps = b.pageSize
    const policies = {}
    const region = Region.create('t', 4096 * ps)
    const u8 = new Uint8Array(region.buffer)
    const allowed = b.syncWpIdleClass()
    const tracker = new b.SyncWpTracker([region.id], true, ${opts.idleClass})
    for (const tid of readdirSync('/proc/self/task')) {
      const stat = readFileSync('/proc/self/task/' + tid + '/stat', 'utf8')
      const name = stat.slice(stat.indexOf('(') + 1, stat.lastIndexOf(')'))
      // field 41 is the policy; fields after the name start at field 3
      if (name.startsWith('uffdm-wp')) policies[name] = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[41 - 3])
    }
    const hog = ${opts.hog} ? new Worker('for (;;) {}', { eval: true }) : null
    const pause = new Int32Array(new SharedArrayBuffer(4))
    if (hog) Atomics.wait(pause, 0, 0, 50) // the hog runs
    // write pages until the guard stepped in (or enough writes that it would have)
    let writes = 0
    const end = Date.now() + 20000
    while (writes < region.pageCount && Date.now() < end && (writes < 200 || (${opts.hog} && tracker.stats.starved === 0))) {
      u8[writes * ps + 1] = 7
      writes++
    }
    // a second without writes: the guard stops ticking after ~100 ms (500 wake-ups a second otherwise)
    const switches = () => {
      for (const tid of readdirSync('/proc/self/task')) {
        const st = readFileSync('/proc/self/task/' + tid + '/status', 'utf8')
        if (/^Name:\\s+uffdm-wp-guard$/m.test(st)) return Number(/^voluntary_ctxt_switches:\\s+(\\d+)/m.exec(st)[1])
      }
      return -1
    }
    const before = switches()
    Atomics.wait(pause, 0, 0, 1000)
    const guardWakeupsIdleSecond = before < 0 ? -1 : switches() - before
    for (let p = 0; p < 10; p++) { u8[(writes + p) * ps + 1] = 7 } // after the quiet second: still tracked
    writes += 10
    const runs = tracker.collect(region.id)
    let reported = 0
    for (let k = 0; k < runs.length; k += 2) reported += runs[k + 1]
    const s = tracker.stats
    tracker.close()
    console.log(JSON.stringify({ allowed, policies, guardWakeupsIdleSecond, writes, reported, starved: s.starved, idleClass: s.idleClass, faults: s.wpFaults + s.missingFaults }))
    process.exit(0)`
  const cmd = ['taskset', '-c', '0', process.execPath, '-e', script]
  // without CAP_SYS_NICE (root keeps the right to use userfaultfd) and with RLIMIT_NICE 0, the default
  if (opts.noSysNice) cmd.unshift('prlimit', '--nice=0', 'setpriv', '--bounding-set=-sys_nice', '--inh-caps=-sys_nice')
  const out = execFileSync(cmd[0], cmd.slice(1), { encoding: 'utf8', timeout: 60_000 })
  return JSON.parse(out.trim().split('\n').pop()!) as ChildResult
}

describe.skipIf(skip)('sync-wp fault thread: idle class and its guard', () => {
  const idleSkip = skip ? undefined : idleClassSkipReason()
  const needIdleClass = (ctx: { skip: () => void }) => {
    if (!idleSkip) return false
    console.warn(`\n*** SKIPPING an idle-class case: ${idleSkip}\n`)
    ctx.skip()
    return true
  }

  it('runs the fault thread in SCHED_IDLE with a normal-class guard; idleClass false: normal class, no guard', (ctx) => {
    if (needIdleClass(ctx)) return
    const idle = runChild({ idleClass: true, hog: false })
    expect(idle.allowed).toBe(true)
    expect(idle.policies).toEqual({ 'uffdm-wp': 5, 'uffdm-wp-guard': 0 })
    expect(idle.writes).toBe(210)
    expect(idle.reported).toBe(210)
    expect(idle.guardWakeupsIdleSecond).toBeGreaterThanOrEqual(0)
    expect(idle.guardWakeupsIdleSecond).toBeLessThan(150)
    const normal = runChild({ idleClass: false, hog: false })
    expect(normal.policies).toEqual({ 'uffdm-wp': 0 })
    expect(normal.reported).toBe(210)
    expect(normal.guardWakeupsIdleSecond).toBe(-1)
    expect(normal.starved).toBe(0)
  })

  it('stays in the normal class where a thread could not leave the idle class again (no CAP_SYS_NICE, RLIMIT_NICE 0)', (ctx) => {
    // here already (a process without the capability), or in a child that drops it (root, setpriv, prlimit)
    const allowedHere = loadBinding().syncWpIdleClass?.() === true
    const canDrop = process.getuid?.() === 0 && spawnSync('setpriv', ['--version']).status === 0 && spawnSync('prlimit', ['--version']).status === 0
    if (!hasTaskset() || (allowedHere && !canDrop)) {
      console.warn('\n*** SKIPPING the no-CAP_SYS_NICE case: it needs taskset, and root with setpriv and prlimit (util-linux) to drop that one capability\n')
      return ctx.skip()
    }
    const r = runChild({ idleClass: true, hog: false, noSysNice: allowedHere })
    expect(r.allowed).toBe(false)
    expect(r.policies).toEqual({ 'uffdm-wp': 0 })
    expect(r.idleClass).toBe(false)
    expect(r.reported).toBe(210)
  })

  it('moves the fault thread back to the normal class when a busy thread on its CPU starves it, losing no write', (ctx) => {
    if (needIdleClass(ctx)) return
    const r = runChild({ idleClass: true, hog: true })
    // every write that completed is reported, whichever class resolved it
    expect(r.reported).toBe(r.writes)
    expect(r.writes).toBeGreaterThanOrEqual(210)
    expect(r.starved).toBeGreaterThanOrEqual(1)
  })
})
