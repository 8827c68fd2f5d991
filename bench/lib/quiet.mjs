// Guarding runs against other tenants' CPU load, the way the C references
// do it (../shared/limits/common.h, clean_begin/clean_end): before a run wait
// (up to QUIET_GATE s) until user-space processes outside our process group
// are idle; after it, if they used more than 5% of the machine, run again
// (at most MAX_RETRY times); a run kept despite foreign load is flagged.
import { readFileSync, readdirSync } from 'node:fs'

const sleepCell = new Int32Array(new SharedArrayBuffer(4))
export function sleepSync(ms) {
  if (ms > 0) Atomics.wait(sleepCell, 0, 0, ms)
}

function statFields(text) {
  // fields after "pid (comm) ": state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime cutime cstime
  return text.slice(text.lastIndexOf(')') + 2).split(' ')
}

let ourPgrp
function pgrp() {
  if (ourPgrp === undefined) ourPgrp = Number(statFields(readFileSync('/proc/self/stat', 'latin1'))[2])
  return ourPgrp
}

/** CPU ticks of user-space processes outside our process group (kernel threads excluded). */
function foreignTicks() {
  const pg = pgrp()
  let sum = 0
  let names
  try {
    names = readdirSync('/proc')
  } catch {
    return 0
  }
  for (const name of names) {
    const c = name.charCodeAt(0)
    if (c < 48 || c > 57) continue
    let f
    try {
      f = statFields(readFileSync(`/proc/${name}/stat`, 'latin1'))
    } catch {
      continue
    }
    if (Number(f[6]) & 0x00200000) continue // PF_KTHREAD
    if (Number(f[2]) === pg) continue
    sum += Number(f[11]) + Number(f[12]) + Number(f[13]) + Number(f[14])
  }
  return sum
}

function totalTicks() {
  try {
    const l = readFileSync('/proc/stat', 'latin1').split('\n', 1)[0].trim().split(/\s+/).slice(1, 9).map(Number)
    return l.reduce((a, b) => a + b, 0)
  } catch {
    return 0
  }
}

export function cpuSnap() {
  return { total: totalTicks(), foreign: foreignTicks() }
}

function foreignDelta(a, b) {
  const tot = b.total - a.total
  const f = Math.max(0, b.foreign - a.foreign)
  return { ticks: f, frac: tot > 0 ? f / tot : 0 }
}

/** Waits until the machine is idle apart from us (or maxSeconds pass). */
export function waitQuiet(maxSeconds = Number(process.env.QUIET_GATE ?? 5)) {
  const deadline = Date.now() + maxSeconds * 1000
  while (maxSeconds > 0) {
    const a = cpuSnap()
    sleepSync(200)
    const b = cpuSnap()
    if (foreignDelta(a, b).ticks <= 2 || Date.now() > deadline) break
  }
}

/**
 * Runs `fn` (sync or async) guarded against foreign load; returns
 * { value, disturbed, foreign } where foreign is the fraction of the machine
 * other processes used during the kept run.
 */
export async function guarded(fn, { maxRetry = Number(process.env.MAX_RETRY ?? 1), gate = true } = {}) {
  for (let tries = 0; ; tries++) {
    if (gate) waitQuiet()
    const a = cpuSnap()
    const value = await fn()
    const d = foreignDelta(a, cpuSnap())
    const disturbed = d.ticks > 2 && d.frac > 0.05
    if (disturbed && tries < maxRetry) {
      if (process.env.VERBOSE) process.stderr.write(`run disturbed (foreign ${(d.frac * 100).toFixed(0)}%), retrying\n`)
      continue
    }
    return { value, disturbed, foreign: d.frac }
  }
}
