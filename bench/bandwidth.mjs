#!/usr/bin/env node
// npm run bench:bandwidth — the operator's bandwidth limits (send --max-bandwidth, --max-postcopy-bandwidth): how
// closely the kernel's pacing of the bulk sockets holds a limit, what it costs the hand-off (nothing, by design), and
// what a limited post-copy push does to the faults the service waits on.
//  A. pre-copy and hybrid, 256 MiB page-store writing 2000 pages/s, no limit / 256 / 64 MiB/s, and 64 MiB/s with
//     --switchover-bandwidth 1GiB: the rounds' rate before the hand-off (their bytes over the time to the pause)
//     against the limit, rounds, why pre-copy stopped, downtime.
//  B. post-copy, the same guest with blocking faults, push at no limit / 128 / 32 MiB/s: the push's rate against the
//     limit, fault p50/p99 while it runs (they go on the demand connection, never paced), time to settled.
// Every row is one real migration between two processes (examples/page-store, the CLI) on loopback; memory is kept
// warm first (bench/lib/warm.mjs). Flags: --runs N (default 3; min/median/max), --json FILE.
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
const MiB = 2 ** 20
const say = (s) => process.stderr.write(`[bench:bandwidth] ${s}\n`)
const limitLabel = (b) => (b ? `${b / MiB} MiB/s` : 'none')
const mmm = (xs) => {
  const s = stats(xs.filter((x) => Number.isFinite(x)))
  return s.n ? `${fmt(s.min)} / ${fmt(s.median)} / ${fmt(s.max)}` : '—'
}

async function migrate(mode, sendArgs, serviceArgs = []) {
  const r = await migrateExample({ example: 'page-store', sizeMiB: 256, writesPerSec: 2000, mode, client: false, sendArgs, serviceArgs })
  if (!r.ok || !r.report) throw new Error(`${mode} ${sendArgs.join(' ')}: ${r.error ?? r.verify}`)
  return r.report
}

const warmS = prewarm(1.5 * 2 ** 30)
say(`kept 1.5 GiB warm (${fmt(warmS)} s)`)
console.log(`# bench:bandwidth, loopback, 256 MiB page-store at 2000 writes/s; ${runs} run(s) per row (min / median / max); memory kept warm first`)
const results = { A: [], B: [] }

// ---- A: pre-copy rounds ---------------------------------------------------------------------------------------
const rowsA = []
for (const mode of ['precopy', 'hybrid']) {
  // the last case tells the convergence check what the hand-off gets (--switchover-bandwidth) instead of the limit
  for (const [limit, switchover] of [[0, 0], [256 * MiB, 0], [64 * MiB, 0], [64 * MiB, 1024 * MiB]]) {
    const samples = []
    const label = `${limitLabel(limit)}${switchover ? `, switchover ${switchover / MiB} MiB/s` : ''}`
    for (let i = 0; i < runs; i++) {
      say(`A ${mode} limit ${label} run ${i + 1}`)
      const r = await migrate(mode, ['--max-rounds', '3', ...(limit ? ['--max-bandwidth', String(limit)] : []), ...(switchover ? ['--switchover-bandwidth', String(switchover)] : [])])
      // pre-copy's last round is its stop-and-copy, in the pause; hybrid's are all before it
      const before = mode === 'precopy' ? r.rounds.slice(0, -1) : r.rounds
      const bytes = before.reduce((n, x) => n + x.bytes, 0)
      const toPauseMs = r.totalMs - r.downtimeMs - r.postcopy.timeToSettledMs
      samples.push({ stop: r.precopyStop, rateMiBs: bytes / MiB / (toPauseMs / 1000), ofLimit: limit ? (bytes / (toPauseMs / 1000)) / limit : NaN, rounds: r.rounds.length, downtimeMs: r.downtimeMs, windowMiB: mode === 'precopy' ? r.rounds[r.rounds.length - 1].bytes / MiB : 0, totalMs: r.totalMs })
    }
    results.A.push({ mode, limit, switchover, samples })
    const col = (k) => mmm(samples.map((s) => s[k]))
    const stops = [...new Set(samples.map((s) => s.stop))].map((k) => `${k} ${samples.filter((s) => s.stop === k).length}`).join(', ')
    rowsA.push([mode, label, col('rateMiBs'), limit ? col('ofLimit') : '—', col('rounds'), stops, col('windowMiB'), col('downtimeMs'), col('totalMs')])
  }
}
console.log('\n## A. Pre-copy rounds under --max-bandwidth (the hand-off is never limited)')
printTable(['mode', 'limit', 'rounds MiB/s before the pause', 'x limit', 'rounds', 'pre-copy stopped', 'pause window MiB', 'downtime ms', 'total ms'], rowsA)

// ---- B: the post-copy push ---------------------------------------------------------------------------------------
const rowsB = []
for (const limit of [0, 128 * MiB, 32 * MiB]) {
  const samples = []
  for (let i = 0; i < runs; i++) {
    say(`B postcopy push limit ${limitLabel(limit)} run ${i + 1}`)
    const r = await migrate('postcopy', limit ? ['--max-postcopy-bandwidth', String(limit)] : [], ['--blocking'])
    const pc = r.postcopy
    const pushedBytes = pc.pushedPages * r.pageSize
    samples.push({ pushMiBs: pushedBytes / MiB / (pc.timeToSettledMs / 1000), ofLimit: limit ? (pushedBytes / (pc.timeToSettledMs / 1000)) / limit : NaN, p50: pc.faultLatencyUs.p50, p99: pc.faultLatencyUs.p99, faults: pc.networkFaults, settleMs: pc.timeToSettledMs, downtimeMs: r.downtimeMs })
  }
  results.B.push({ limit, samples })
  const col = (k) => mmm(samples.map((s) => s[k]))
  rowsB.push([limitLabel(limit), col('pushMiBs'), limit ? col('ofLimit') : '—', col('faults'), col('p50'), col('p99'), col('settleMs'), col('downtimeMs')])
}
console.log('\n## B. The post-copy push under --max-postcopy-bandwidth (faults on their own connection)')
printTable(['push limit', 'push MiB/s', 'x limit', 'network faults', 'fault p50 us', 'fault p99 us', 'settled after ms', 'downtime ms'], rowsB)
console.log('\nrounds MiB/s: bytes of the rounds sent before the pause over the time from the start to the pause (setup included, so a little under the limit); ' +
  'push MiB/s: pushed bytes over the time from the resume to settled (faults answered meanwhile included, so a little under the limit)')
if (jsonOut) writeFileSync(jsonOut, JSON.stringify(results, null, 2))
