#!/usr/bin/env node
// npm run bench:postcopy — post-copy strategies on the same workloads.
//  A. Hines et al.'s Table 2 shape: a 1 GiB guest, working sets of 8/32/128/512 MiB
//     touched sequentially and at random right after a post-copy hand-off, for
//     demand-only, push-only, bubbling with one pivot, and bubbling with k = 7
//     adaptive windows (the default).
//  B. kv-store under a checking client, with and without ready() on its request path:
//     event-loop blocked time on the destination from the hand-off to settled, with
//     the agent at nice 0 and 10, on loopback and on a namespace link.
//  C. free pages: 1 GiB, 10/50/90% free, with and without free() reporting (hybrid).
//  D. guest stall: a 512 MiB page-store writing 100k random pages/s from a 0.5 ms loop
//     (blocking faults), post-copy, each strategy: the longest interval without a loop
//     iteration on the destination, fault p50/p99 while the push runs, total time.
//  E. free() on a destination in post-copy: what zero-filling the range costs the service's thread.
// Every row is one real migration between two processes (examples/, the CLI).
// Flags: --quick, --runs N (repeat table A and B, min/median/max), --link loopback|netns,
//        --only A,B,C,D,E, --d-strategies demand,push,bubble (table D), --json FILE, --b-links loopback,netns (table B's links; default
//        loopback plus netns when available), --agent-nice 0,10 (table B's agent nice values)
import { createRequire } from 'node:module'
import { readFileSync, writeFileSync } from 'node:fs'
import { flag, opt } from './lib/args.mjs'
import { runLimits, repoRoot } from './lib/limits.mjs'
import { printTable, stats, fmt } from './lib/table.mjs'
import { modelFaults } from './lib/policy-model.mjs'
import { prewarm } from './lib/warm.mjs'

const require = createRequire(import.meta.url)
const { migrateExample } = require(`${repoRoot}/dist/cli/demo.js`)
const { createHostPair, netnsUnavailable } = require(`${repoRoot}/dist/testing/netns.js`)

const quick = flag('quick')
const runs = Number(opt('runs', quick ? 1 : 3))
const only = new Set(opt('only', 'A,B,C,D,E').split(','))
const link = opt('link', 'loopback')
const say = (s) => process.stderr.write(`${s}\n`)
const GiB = 2 ** 30
const results = { A: [], B: [], C: [], D: [] }

let hosts
if (link === 'netns') {
  const why = netnsUnavailable()
  if (why) {
    say(`*** --link netns unavailable: ${why}`)
    process.exit(2)
  }
  hosts = createHostPair(211)
  hosts.shape(1000)
  for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => (hosts.cleanup(), process.exit(130)))
}
const where = hosts ? { destNetns: hosts.ns, destHost: hosts.nsIp } : {}
// Table B's links and agent nice values (see there).
const agentNices = opt('agent-nice', '0,10').split(',').map(Number)
const bLinks = opt('b-links', link === 'loopback' && only.has('B') && !netnsUnavailable() ? 'loopback,netns' : link).split(',')
let bHosts
function netnsWhere() {
  if (hosts) return where
  if (!bHosts) {
    const why = netnsUnavailable()
    if (why) throw new Error(`--b-links netns unavailable: ${why}`)
    bHosts = createHostPair(212)
    bHosts.shape(1000)
    for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => (bHosts.cleanup(), process.exit(130)))
  }
  return { destNetns: bHosts.ns, destHost: bHosts.nsIp }
}

/** The JSON after `PREFIX ` on the first such line a service printed (destination's by default). */
function json(r, prefix, lines = r.destLines) {
  const l = (lines ?? []).find((x) => x.startsWith(`${prefix} `))
  return l ? JSON.parse(l.slice(prefix.length + 1)) : undefined
}

try {
  // the guests (1 GiB on each side at most) and the C references (postcopy-demand: a 4 GiB source) run on memory
  // kept warm to the end (see bench/lib/warm.mjs)
  const warmS = prewarm(5 * GiB)
  say(`warmed 5 GiB in ${fmt(warmS)} s`)
  console.log(`# bench:postcopy on ${link === 'netns' ? 'two namespace hosts, 1 Gbit/s tbf link' : 'loopback'}; ${runs} run(s) per row; machine: 2 vCPUs, shared`)
  console.log(`# memory: 5 GiB warmed before the C references and the first migration, kept warm to the end (${fmt(warmS)} s; bench/lib/warm.mjs)`)
  const ref = runLimits(['tcp-tput', 'postcopy-demand'], { nruns: quick ? 1 : 3, log: say })
  if (ref.size) {
    printTable(['reference (C, nothing in the way)', 'unit', 'min', 'median', 'max'],
      [...ref.values()].filter((r) => !/\.(mean|p90|deliver)/.test(r.id)).map((r) => [r.id, r.unit, fmt(r.min), fmt(r.median), fmt(r.max)]))
    console.log('')
  }

  // ---- A: Hines Table 2 ---------------------------------------------------------
  if (only.has('A')) {
    const strategies = ['demand', 'push', 'bubble1', 'bubble']
    const sets = quick ? [8, 128] : [8, 32, 128, 512]
    // The same policies and touch orders in a model (no network, no noise): what
    // each can reach, and the bound of an oracle that pushes exactly the working set.
    const model = {}
    const modelRows = []
    for (const pattern of ['sequential', 'random']) {
      for (const ws of sets) {
        const o = { guestPages: (1024 << 20) / 4096, wsPages: (ws << 20) / 4096, firstPage: (320 << 20) / 4096, pattern }
        const m = Object.fromEntries(['push', 'bubble1', 'bubble', 'oracle'].map((strategy) => [strategy, modelFaults({ ...o, strategy })]))
        // the agent hears of faults in batches (every millisecond: ~16 faults of a sequential scan here)
        const late = modelFaults({ ...o, strategy: 'bubble', faultReportLag: 16 })
        model[`${pattern}${ws}`] = m
        modelRows.push([pattern, `${ws} MiB`, `${fmt(m.push)}%`, `${fmt(m.bubble1)}%`, `${fmt(m.bubble)}%`, `${fmt(late)}%`, `${fmt(m.oracle)}%`, `x${fmt(m.bubble / m.push)}`, `x${fmt(m.oracle / m.push)}`])
      }
    }
    console.log('A0. model: network faults/touched with the real policies, 64 pages pushed per fault served, 0.3 per local touch, no network')
    printTable(['pattern', 'working set', 'push', 'bubble1', 'bubble', 'bubble, faults heard 16 late', 'oracle (pushes the working set only)', 'bubble/push', 'best possible/push'], modelRows)
    console.log('')
    const rows = []
    for (const pattern of ['sequential', 'random']) {
      for (const ws of sets) {
        for (const strategy of strategies) {
          const samples = []
          for (let i = 0; i < runs; i++) {
            say(`A: ${pattern} ${ws} MiB ${strategy} run ${i + 1}/${runs}`)
            const r = await migrateExample({
              example: 'scan-service', sizeMiB: 1024, mode: 'postcopy', ...where,
              serviceArgs: ['--ws-mib', String(ws), '--pattern', pattern],
              sendArgs: ['--prepaging', strategy],
            })
            const res = json(r, 'RESULT')
            if (!r.ok || !res) {
              say(`   failed: ${r.error ?? r.verify}`)
              continue
            }
            const pc = r.report.postcopy
            samples.push({
              faultPct: (100 * pc.networkFaults) / res.touched, demandPct: (100 * pc.demandPages) / res.touched, totalMs: r.report.totalMs, settleMs: pc.timeToSettledMs,
              p50: pc.faultLatencyUs.p50, p99: pc.faultLatencyUs.p99, blockedMs: res.blockedMs, workloadMs: res.workloadMs,
            })
          }
          const m = (k) => stats(samples.map((s) => s[k])).median
          results.A.push({ pattern, ws, strategy, samples })
          rows.push([pattern, `${ws} MiB`, strategy, samples.length ? `${fmt(m('faultPct'))}%` : 'failed', samples.length ? `${fmt(m('demandPct'))}%` : '', fmt(m('totalMs')), fmt(m('settleMs')), fmt(m('p50')), fmt(m('p99')), fmt(m('blockedMs')), fmt(m('workloadMs'))])
        }
      }
    }
    console.log('A. post-copy strategies, 1 GiB guest, workload right after the hand-off (medians)')
    console.log('  net faults: faults that sent a page request; fetched on demand: pages that came on the urgent channel')
    console.log('  (the rest of the requests were for pages the push had already sent: they waited for the bulk channel)')
    printTable(['pattern', 'working set', 'strategy', 'net faults/touched', 'fetched on demand/touched', 'total ms', 'settled ms', 'fault p50 us', 'fault p99 us', 'blocked ms', 'workload ms'], rows, { align: [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1] })
    // the targets
    const med = (pattern, ws, strategy) => stats(results.A.find((x) => x.pattern === pattern && x.ws === ws && x.strategy === strategy)?.samples.map((s) => s.faultPct) ?? []).median
    const checks = []
    for (const ws of sets) {
      const seq = med('sequential', ws, 'bubble')
      checks.push([`sequential ${ws} MiB: bubble faults <= 5% of touched`, `${fmt(seq)}%`, seq <= 5 ? 'pass' : 'FAIL'])
      const rb = med('random', ws, 'bubble'), rp = med('random', ws, 'push')
      const mr = model[`random${ws}`]
      checks.push([`random ${ws} MiB: bubble faults <= 0.5 x push-only's`, `${fmt(rb)}% vs ${fmt(rp)}% (x${fmt(rb / rp)}; model x${fmt(mr.bubble / mr.push)}, best possible x${fmt(mr.oracle / mr.push)})`, rb <= 0.5 * rp ? 'pass' : 'FAIL'])
    }
    printTable(['target', 'measured', ''], checks)
    console.log('')
  }

  // ---- B: kv-store with and without ready() -------------------------------------------
  // On every link of --b-links (default: loopback, and the namespace link when this
  // machine has one: on loopback the two hosts share the CPUs with the client), and
  // for every agent nice value of --agent-nice (default 0,10).
  if (only.has('B')) {
    const rows = []
    const checks = []
    for (const bLink of bLinks) {
      const bWhere = bLink === link ? where : netnsWhere()
      for (const agentNice of agentNices) {
        const blocked = {}
        for (const ready of [false, true]) {
          const samples = []
          for (let i = 0; i < runs; i++) {
            say(`B: ${bLink}, agent nice ${agentNice}, kv-store ${ready ? 'with' : 'without'} ready() run ${i + 1}/${runs}`)
            const r = await migrateExample({ example: 'kv-store', sizeMiB: 1024, keys: 100_000, mode: 'postcopy', agentNice, ...bWhere, serviceArgs: ready ? ['--ready'] : [] })
            const lag = json(r, 'LAG')
            const lagBefore = json(r, 'LAG_BEFORE', r.sourceLines)
            if (!r.report || !lag) {
              say(`   failed: ${r.error ?? r.verify}`)
              continue
            }
            samples.push({ blockedMs: lag.blockedMs, maxBlockMs: lag.maxBlockMs, perS: (1000 * lag.blockedMs) / lag.durationMs, beforePerS: lagBefore ? (1000 * lagBefore.blockedMs) / lagBefore.durationMs : NaN, settleMs: r.report.postcopy.timeToSettledMs, faults: r.report.postcopy.networkFaults, demand: r.report.postcopy.demandPages, wrong: r.client.wrong, ok: r.client.ok, verify: r.verify })
          }
          blocked[ready] = stats(samples.map((s) => s.blockedMs))
          results.B.push({ link: bLink, agentNice, ready, samples })
          const b = blocked[ready]
          const med = (k) => fmt(stats(samples.map((s) => s[k])).median)
          rows.push([bLink, String(agentNice), ready ? 'with ready()' : 'without (faults block)', `${fmt(b.min)} / ${fmt(b.median)} / ${fmt(b.max)}`, med('perS'), med('beforePerS'), med('maxBlockMs'), med('settleMs'), med('faults'), med('demand'), samples.reduce((n, s) => n + s.ok, 0), samples.reduce((n, s) => n + s.wrong, 0), samples.length === runs && samples.every((s) => s.verify?.startsWith('ok')) ? 'ok' : 'FAIL'])
        }
        const ratio = blocked.true.median / blocked.false.median
        const noWrong = results.B.filter((x) => x.link === bLink && x.agentNice === agentNice).every((x) => x.samples.every((s) => s.wrong === 0))
        checks.push([`${bLink}, agent nice ${agentNice}: blocked with ready() <= 0.25 x without, no wrong answers`, `x${fmt(ratio)}`, ratio <= 0.25 && noWrong ? 'pass' : 'FAIL'])
      }
    }
    console.log('B. kv-store (1 GiB arena, 100k keys, checking client), post-copy: destination event loop blocked from hand-off to settled')
    console.log('  blocked per s: the same meter as a rate; source before the hand-off: the rate on the source under the same client, before the migration')
    console.log(`  links: loopback = both hosts and the client share this machine's CPUs; netns = two namespace hosts, 1 Gbit/s tbf link (same CPUs, a real link between them)`)
    printTable(['link', 'agent nice', 'request path', 'blocked ms min/med/max', 'blocked ms per s', 'source before hand-off, ms per s', 'longest block ms', 'settled ms', 'network faults', 'demand pages', 'good answers', 'wrong', 'verify'], rows)
    printTable(['target', 'measured', ''], checks)
    console.log('')
  }

  // ---- C: free pages ---------------------------------------------------------------------
  if (only.has('C')) {
    const rows = []

    const checks = []
    for (const pct of quick ? [90] : [10, 50, 90]) {
      const by = {}
      for (const report of [false, true]) {
        const samples = []
        for (let i = 0; i < runs; i++) {
          say(`C: ${pct}% free, ${report ? 'reported' : 'not reported'} run ${i + 1}/${runs}`)
          const r = await migrateExample({ example: 'scan-service', sizeMiB: 1024, mode: 'hybrid', ...where, serviceArgs: ['--free-pct', String(pct), ...(report ? [] : ['--no-report'])] })
          if (!r.ok) {
            say(`   failed: ${r.error ?? r.verify}`)
            continue
          }
          samples.push(r.report)
          results.C.push({ pct, report, bytesOnWire: r.report.bytesOnWire, totalMs: r.report.totalMs })
        }
        if (!samples.length) {
          rows.push([`${pct}%`, report ? 'free()' : 'none', 'failed', '', '', ''])
          continue
        }
        const wire = stats(samples.map((x) => x.bytesOnWire)).median
        const t = stats(samples.map((x) => x.totalMs))
        const last = samples[samples.length - 1]
        by[report] = { bytesOnWire: wire, totalMs: t.median }
        rows.push([`${pct}%`, report ? 'free()' : 'none', fmt(wire / 2 ** 20), fmt(wire / GiB), `${fmt(t.min)} / ${fmt(t.median)} / ${fmt(t.max)}`, `${last.pages.data} / ${last.pages.zero} / ${last.pages.free}`])
      }
      if (pct === 90 && by.true && by.false) {
        checks.push(['90% free: bytes on the wire <= 0.15 x guest size', `x${fmt(by.true.bytesOnWire / GiB)}`, by.true.bytesOnWire <= 0.15 * GiB ? 'pass' : 'FAIL'])
        checks.push(['90% free: total time <= 0.25 x without reporting (medians)', `x${fmt(by.true.totalMs / by.false.totalMs)}`, by.true.totalMs <= 0.25 * by.false.totalMs ? 'pass' : 'FAIL'])
      }
    }
    console.log('C. free-page skipping, 1 GiB guest, hybrid')
    printTable(['free', 'reporting', 'MiB on wire (median)', 'x guest size', 'total ms min/med/max', 'pages data / zero / free'], rows)
    printTable(['target', 'measured', ''], checks)
  }
  // ---- D: guest stall under 100k writes/s -----------------------------------------------
  if (only.has('D')) {
    const rows = []
    const checks = []
    const refP50 = ref.get('7.demand.none.p50')?.median
    for (const strategy of opt('d-strategies', 'demand,push,bubble').split(',')) {
      const samples = []
      for (let i = 0; i < runs; i++) {
        say(`D: ${strategy} run ${i + 1}/${runs}`)
        const dropsBefore = rcvQueueDrops()
        const r = await migrateExample({
          sizeMiB: 512, mode: 'postcopy', writesPerSec: 100_000, client: false, ...where,
          serviceArgs: ['--blocking', '--loop-us', '500'], sendArgs: ['--prepaging', strategy],
        })
        const st = json(r, 'STALL')
        if (!r.ok || !st) {
          say(`   failed: ${r.error ?? r.verify}`)
          continue
        }
        const pc = r.report.postcopy
        const bp = pc.faultLatencyByPathUs
        samples.push({
          drops: hosts ? NaN : rcvQueueDrops() - dropsBefore,
          stallMs: st.maxMs, p50: pc.faultLatencyUs.p50, p99: pc.faultLatencyUs.p99, faults: pc.networkFaults, totalMs: r.report.totalMs, settleMs: pc.timeToSettledMs,
          replyP99: bp?.reply.count ? bp.reply.p99 : NaN, pushP50: bp?.push.count ? bp.push.p50 : NaN,
          pushShare: bp ? (100 * bp.push.count) / Math.max(1, bp.push.count + bp.reply.count) : NaN,
        })
      }
      results.D.push({ strategy, samples })
      const col = (k) => {
        const xs = samples.map((x) => x[k]).filter(Number.isFinite), t = stats(xs)
        return !samples.length ? 'failed' : xs.length ? `${fmt(t.min)} / ${fmt(t.median)} / ${fmt(t.max)}` : '—'
      }
      rows.push([strategy, col('stallMs'), col('p50'), col('p99'), col('replyP99'), col('pushShare'), col('pushP50'), col('faults'), col('settleMs'), col('totalMs'), col('drops')])
      if (strategy === 'bubble' && samples.length) {
        const m = (k) => stats(samples.map((x) => x[k])).median
        checks.push(['longest stall <= 150 ms', `${fmt(m('stallMs'))} ms`, m('stallMs') <= 150 ? 'pass' : 'FAIL'])
        checks.push(['total time <= 1.5 s', `${fmt(m('totalMs'))} ms`, m('totalMs') <= 1500 ? 'pass' : 'FAIL'])
        if (refP50) {
          checks.push(['fault p50 <= 2 x 7.demand.none.p50', `${fmt(m('p50'))} us vs ${fmt(refP50)} us (x${fmt(m('p50') / refP50)})`, m('p50') <= 2 * refP50 ? 'pass' : 'FAIL'])
          checks.push(['fault p99 <= 10 x 7.demand.none.p50', `${fmt(m('p99'))} us (x${fmt(m('p99') / refP50)})`, m('p99') <= 10 * refP50 ? 'pass' : 'FAIL'])
        }
      }
    }
    console.log('D. guest stall: 512 MiB page-store, 100k random page writes/s from a 0.5 ms loop, blocking faults, post-copy (min / median / max)')
    console.log('  stall: longest interval without a loop iteration on the destination, from the restore to settled; faults: network faults')
    console.log('  by path (native demand path): reply = the page request\'s own reply, timed to its install; push = the page was already')
    console.log('  on its way in the push when the fault came (its share of the faults, and its p50: seen up to 1 ms late, an upper bound)')
    console.log('  rcvq drops: segments TCP dropped for want of receive buffer during the migration (TcpExt TCPRcvQDrop, this namespace,')
    console.log('  loopback only): each can stall the push a retransmission timeout (200 ms), see docs/data-plane.md')
    printTable(['strategy', 'longest stall ms', 'fault p50 us', 'fault p99 us', 'reply p99 us', 'push %', 'push p50 us', 'faults', 'settled ms', 'total ms', 'rcvq drops'], rows)
    printTable(['target (bubble, the default)', 'measured', ''], checks)
    console.log('')
  }
  // ---- E: free() on a destination in post-copy ------------------------------------------
  if (only.has('E')) {
    // the range's missing pages are zero-filled by the service's own thread, through the agent's userfaultfd, before
    // free() returns (so that a reuse right after neither faults over the network nor reads the old bytes): its cost
    const { Guest } = require(`${repoRoot}/dist/guest.js`)
    const { freePort } = require(`${repoRoot}/dist/cli/proc.js`)
    const sizes = [64 << 10, 2 << 20, 16 << 20, 128 << 20, 512 << 20]
    const us = sizes.map(() => [])
    for (let i = 0; i < runs + 1; i++) {
      say(`E: run ${i + 1}/${runs + 1}${i === 0 ? ' (warm-up, not counted)' : ''}`)
      const port = await freePort(), token = 'bench-free-token-0123456789abcdef'
      const destination = Guest.start({ name: `e-d-${port}`, regions: { mem: GiB }, receive: `127.0.0.1:${port}`, token, control: false, exitOnMoved: false })
      const source = await Guest.start({ name: `e-s-${port}`, regions: { mem: GiB }, token, control: false, exitOnMoved: false, pause: () => ({}) })
      new Uint8Array(source.regions.mem.buffer).fill(1) // every page holds data: all of them missing at the destination
      const report = source.migrate({ to: `127.0.0.1:${port}`, mode: 'postcopy', prepaging: { strategy: 'demand', idleFillMs: 600_000 } })
      report.catch(() => {})
      const dest = await destination
      let off = 0
      sizes.forEach((bytes, k) => {
        const t = process.hrtime.bigint()
        dest.regions.mem.free(off, bytes)
        if (i > 0) us[k].push(Number(process.hrtime.bigint() - t) / 1000)
        off += bytes
      })
      await Promise.all([dest.close(), source.close()])
      dest.regions.mem.region.release()
      source.regions.mem.region.release()
    }
    console.log(`E. free() on a destination in post-copy: time in the service's thread (pages missing there; ${runs} run(s) after a warm-up)`)
    printTable(['freed', 'µs min / median / max', 'µs per page (median)'], sizes.map((bytes, k) => {
      const t = stats(us[k])
      return [`${bytes >> 10} KiB`, `${fmt(t.min)} / ${fmt(t.median)} / ${fmt(t.max)}`, fmt(t.median / (bytes / 4096))]
    }))
  }
  const out = opt('json')
  if (out) writeFileSync(out, JSON.stringify(results, null, 2))
} finally {
  hosts?.cleanup()
  bHosts?.cleanup()
}

/** TcpExt TCPRcvQDrop of this network namespace (/proc/net/netstat); NaN where it cannot be read. */
function rcvQueueDrops() {
  try {
    const lines = readFileSync('/proc/net/netstat', 'utf8').split('\n').filter((l) => l.startsWith('TcpExt:'))
    const names = lines[0].trim().split(/\s+/), values = lines[1].trim().split(/\s+/)
    const i = names.indexOf('TCPRcvQDrop')
    return i > 0 ? Number(values[i]) : NaN
  } catch {
    return NaN
  }
}
