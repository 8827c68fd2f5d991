#!/usr/bin/env node
// npm run bench:takeover — what a crash of a migration agent costs when a new agent takes the migration over
// (src/agent-handle.ts; the destination's standby: src/agent/destination/takeover.ts), against the same migration
// without a crash.
//  A. post-copy, 256 MiB page-store writing 2000 pages/s whose faults block (--blocking), the push held to
//     64 MiB/s so that the crash (UFFD_MIGRATE_FAULT_INJECT=agent-crash:postcopy, once pages moved after the
//     hand-off) comes with most pages still at the source: total time, the destination's time without a source
//     (its `link-back` line: the crash, the old worker's exit, the new agent's start, its dial and RECOVER), fault
//     p50/p99, every page verified. The same with the destination's agent crashing 200 ms after the service resumed
//     there (agent-crash:postcopy in the destination's environment): the standby takes over; its time without an
//     agent is from the JSON log lines' times (agent-crashed → link-back). And the destination's agent crashing as it
//     asks for the restore (agent-crash:restore): the main thread starts a standby then, which takes over; a run where
//     the crash reached the main thread before the restore request (the service resumed at the source) is run again.
//  B. the crash as the paused service's state arrives, before HANDOFF (agent-crash:paused): how long the service
//     stood paused before it resumed at the source (from the JSON log lines' times: agent-crashed → migration-failed).
// Every row is a real migration between two processes (examples/page-store, the CLI) on loopback; memory kept warm
// first (bench/lib/warm.mjs). Flags: --runs N (default 3; min/median/max), --json FILE.
import { createRequire } from 'node:module'
import { writeFileSync } from 'node:fs'
import { opt } from './lib/args.mjs'
import { repoRoot } from './lib/limits.mjs'
import { printTable, stats, fmt } from './lib/table.mjs'
import { prewarm } from './lib/warm.mjs'

const require = createRequire(import.meta.url)
const { migrateExample } = require(`${repoRoot}/dist/cli/demo.js`)

const runs = Number(opt('runs', 3))
const jsonOut = opt('json', undefined)
const say = (s) => process.stderr.write(`[bench:takeover] ${s}\n`)
const mmm = (xs) => {
  const s = stats(xs.filter((x) => Number.isFinite(x)))
  return s.n ? `${fmt(s.min)} / ${fmt(s.median)} / ${fmt(s.max)}` : '—'
}
const json = { UFFD_MIGRATE_LOG_FORMAT: 'json' }
const events = (log) => (log ?? '').split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l))

async function migrate(mode, inject, sendArgs, side = 'source') {
  const env = (s) => ({ ...json, ...(inject && side === s ? { UFFD_MIGRATE_FAULT_INJECT: inject } : {}) })
  return migrateExample({
    example: 'page-store', sizeMiB: 256, writesPerSec: 2000, mode, client: false, serviceArgs: ['--blocking'], sendArgs,
    sourceEnv: env('source'), destEnv: env('destination'),
  })
}
const gapMs = (log, from, to) => {
  const ev = events(log), a = ev.find((e) => e.event === from), b = ev.find((e) => e.event === to && (!a || Date.parse(e.time) >= Date.parse(a.time)))
  return a && b ? Date.parse(b.time) - Date.parse(a.time) : NaN
}

const warmS = prewarm(1.5 * 2 ** 30)
say(`kept 1.5 GiB warm (${fmt(warmS)} s)`)
console.log(`# bench:takeover, loopback, 256 MiB page-store at 2000 writes/s, blocking faults; ${runs} run(s) per row (min / median / max); memory kept warm first`)
const results = { A: [], B: [] }

// ---- A: a crash in post-copy -------------------------------------------------------------------------------
const rowsA = []
for (const [inject, side] of [[undefined, 'source'], ['agent-crash:postcopy', 'source'], ['agent-crash:postcopy', 'destination'], ['agent-crash:restore', 'destination']]) {
  const samples = [], name = inject ? `${side}: ${inject}` : 'none'
  let resumedAtSource = 0 // agent-crash:restore: the crash reached the main thread before the restore request (NO_SESSION)
  for (let i = 0; i < runs; i++) {
    say(`A ${name} run ${i + 1}`)
    const r = await migrate('postcopy', inject, ['--max-postcopy-bandwidth', '64MiB'], side)
    if (inject === 'agent-crash:restore' && !r.ok && /NO_SESSION/.test(r.error ?? '') && resumedAtSource < runs) {
      resumedAtSource++
      i--
      continue
    }
    if (!r.ok || !r.report) throw new Error(`A ${name}: ${r.error ?? r.verify}`)
    const back = /the source came back after (\d+) ms/.exec(r.destLog ?? '')
    const tookOver = side === 'source' ? r.report.takeover !== undefined : /"event":"agent-takeover"/.test(r.destLog ?? '')
    // the gap: the source's crash → its new agent's RECOVER answered; the destination's crash → the source back at the standby
    const withoutMs = !inject ? 0 : side === 'source' ? (back ? Number(back[1]) : NaN) : gapMs(r.destLog, 'agent-crashed', 'link-back')
    const pc = r.report.postcopy
    samples.push({ totalMs: r.report.totalMs, withoutMs, p50: pc.faultLatencyUs.p50, p99: pc.faultLatencyUs.p99, max: pc.faultLatencyUs.max / 1000, faults: pc.networkFaults, takeover: tookOver ? 1 : 0, verify: r.verify })
  }
  results.A.push({ inject: name, samples })
  const col = (k) => mmm(samples.map((s) => s[k]))
  rowsA.push([name + (resumedAtSource ? ` (+${resumedAtSource} resumed at the source: crash seen first)` : ''), `${samples.filter((s) => s.takeover).length}/${samples.length}`, col('totalMs'), col('withoutMs'), col('faults'), col('p50'), col('p99'), col('max'), [...new Set(samples.map((s) => s.verify))].join(', ')])
}
console.log('\n## A. A migration agent crashes in post-copy (push held to 64 MiB/s)')
printTable(['crash', 'taken over', 'total ms', 'link without one of its agents ms', 'network faults', 'fault p50 us', 'fault p99 us', 'longest fault ms', 'verify'], rowsA)

// ---- B: a crash with the service paused, before HANDOFF ------------------------------------------------------
const rowsB = []
const samplesB = []
for (let i = 0; i < runs; i++) {
  say(`B agent-crash:paused run ${i + 1}`)
  const r = await migrate('hybrid', 'agent-crash:paused', [])
  const ev = events(r.sourceLog)
  const crashed = ev.find((e) => e.event === 'agent-crashed'), failed = ev.find((e) => e.event === 'migration-failed')
  if (r.ok || !crashed || !failed || !/the service resumed on the source/.test(failed.msg)) throw new Error(`B: expected the service to resume at the source: ${r.error}`)
  samplesB.push({ pausedAfterCrashMs: Date.parse(failed.time) - Date.parse(crashed.time) })
}
results.B = samplesB
rowsB.push(['agent-crash:paused', mmm(samplesB.map((s) => s.pausedAfterCrashMs))])
console.log('\n## B. The source agent crashes as the service paused, before HANDOFF: the service resumes at the source')
printTable(['crash', 'crash → resumed at the source ms (log times)'], rowsB)
console.log('\nlink without one of its agents: a source crash, the destination\'s `the source came back after T ms` line (the old agent\'s sockets closed → the new agent\'s RECOVER); ' +
  'a destination crash, its JSON log lines\' times (agent-crashed → link-back: the standby took over, listened, and the source dialled in again). ' +
  'Faults that wait meanwhile show in the longest fault. B: the JSON log lines\' times, ms resolution.')
if (jsonOut) writeFileSync(jsonOut, JSON.stringify(results, null, 2))
