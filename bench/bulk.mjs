#!/usr/bin/env node
// npm run bench:bulk — bulk throughput and CPU per GiB of the data path.
// One real migration per row (examples/page-store, idle, pre-copy), 1 GiB by
// default: round 0 moves every populated page once (7 of 8 pages hold data,
// the 8th goes as a zero range), so its rate is the bulk path's. For the
// native data path (the destination's bulk reader thread) and the JS one
// (UFFD_MIGRATE_BULK=js: frames through the agent's event loop), on loopback
// and on a namespace link shaped to 8 Gbit/s; beside them, in the same run and
// after the same warm-up, the C reference (../shared/limits postcopy-bulk:
// recv 1 MiB + UFFDIO_COPY) and raw Node TCP over the same shaped link.
// Two memory layouts: the page-store's own (every 8th page never written, so
// pages go in 7-page runs: one frame and one UFFDIO_COPY each) and a dense
// guest (--fill-every 1e9: 256-page frames, the C reference's layout). Each
// layout also has a C twin (bench/c/sparse_tcp.c: the same memory sent and
// placed by plain C over loopback), held to the same lines: a line the twin
// misses is the layout's cost, not the engine's.
// Flags: --mib N (1024), --runs N (3), --links loopback,netns, --paths native,js, --rate-mbit N (8000),
//        --streams 1,2,4 (native path: parallel bulk streams, send --streams; default 1),
//        --paths sealed: the native path of an encrypted migration (send --encrypt: the bulk threads seal and open), with --streams too,
//        --layouts sparse,dense (default both), --json FILE
import { createRequire } from 'node:module'
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { opt } from './lib/args.mjs'
import { repoRoot, runCBench, runLimits } from './lib/limits.mjs'
import { fmt, printTable, stats } from './lib/table.mjs'
import { measureTcp } from './lib/tcp-tput.mjs'
import { prewarm } from './lib/warm.mjs'

const require = createRequire(import.meta.url)
const { migrateExample } = require(`${repoRoot}/dist/cli/demo.js`)
const { createHostPair, netnsUnavailable } = require(`${repoRoot}/dist/testing/netns.js`)

const mib = Number(opt('mib', 1024))
const runs = Number(opt('runs', 3))
const paths = opt('paths', 'native,js').split(',')
const rateMbit = Number(opt('rate-mbit', 8000))
const streamCounts = opt('streams', '1').split(',').map(Number)
const LAYOUTS = { sparse: '8', dense: '1000000000' } // page-store --fill-every
const layouts = opt('layouts', 'sparse,dense').split(',')
for (const l of layouts) if (!LAYOUTS[l]) throw new Error(`--layouts: expected sparse and/or dense, got ${l}`)
let links = opt('links', 'loopback,netns').split(',')
const say = (s) => process.stderr.write(`[bench:bulk] ${s}\n`)
const MiB = 2 ** 20, GiB = 2 ** 30

const netnsWhy = links.includes('netns') ? netnsUnavailable() : undefined
if (netnsWhy) {
  say(`*** SKIPPING the namespace link: ${netnsWhy}`)
  links = links.filter((l) => l !== 'netns')
}
const pair = links.includes('netns') ? createHostPair(213) : undefined
pair?.shape(rateMbit)
for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => (pair?.cleanup(), process.exit(130)))

try {
  // kept warm for the whole run (bench/lib/warm.mjs): both guests (2 x mib), or the C reference's two 4 GiB regions
  const warmGiB = Math.max((2 * mib) / 1024 + 1, 8.5)
  say(`warming ${warmGiB} GiB ...`)
  const warmS = prewarm(warmGiB * GiB)
  const ref = runLimits(['postcopy-bulk'], { nruns: 3, log: say })
  // the sparse layout's own install cost (UFFDIO_COPY per 7-page run against per 256 pages), C, same warm-up
  for (const [k, v] of runCBench(join(repoRoot, 'bench', 'c', 'copy_runs.c'), { nruns: 5, log: say })) ref.set(k, v)
  // the C twin of each layout end to end over loopback TCP (what the layout costs the best plain C receiver)
  for (const [k, v] of runCBench(join(repoRoot, 'bench', 'c', 'sparse_tcp.c'), { nruns: 5, log: say })) ref.set(k, v)
  // the source's send: plain vs MSG_ZEROCOPY from populated memory (why the agent does not use it: see docs/data-plane.md)
  for (const [k, v] of runCBench(join(repoRoot, 'bench', 'c', 'zerocopy_send.c'), { nruns: 3, log: say })) ref.set(k, v)
  // write-protecting a region before round 0: the three ways (the tracker uses the exclusive scan; see src/agent/tracker.ts)
  for (const [k, v] of runCBench(join(repoRoot, 'bench', 'c', 'protect_all.c'), { nruns: 3, log: say })) ref.set(k, v)
  const tcp = {}
  for (const link of links) {
    const o = link === 'netns' ? { host: pair.nsIp, prefix: ['ip', 'netns', 'exec', pair.ns] } : { host: '127.0.0.1' }
    const r = []
    for (let i = 0; i < 3; i++) r.push((await measureTcp({ seconds: 3, ...o })).mibPerSec)
    tcp[link] = stats(r)
    say(`raw Node TCP ${link}: ${r.map(fmt).join(', ')} MiB/s`)
  }
  const results = []
  for (const link of links) {
    for (const layout of layouts) for (const [path, streams] of paths.flatMap((p) => (p !== 'js' ? streamCounts.map((n) => [p, n]) : [[p, 1]]))) {
      const samples = []
      for (let i = 0; i < runs; i++) {
        say(`${link} ${layout} ${path} streams ${streams} run ${i + 1}/${runs}`)
        if (path === 'js') process.env.UFFD_MIGRATE_BULK = 'js'
        let r
        try {
          r = await migrateExample({
            sizeMiB: mib, mode: 'precopy', writesPerSec: 0, client: false, sendArgs: ['--streams', String(streams), ...(path === 'sealed' ? ['--encrypt'] : [])], serviceArgs: ['--fill-every', LAYOUTS[layout]],
            ...(link === 'netns' ? { destNetns: pair.ns, destHost: pair.nsIp } : {}),
          })
        } finally {
          delete process.env.UFFD_MIGRATE_BULK
        }
        const rep = r.report
        if (!r.ok || !rep) {
          say(`   failed: ${r.error ?? r.verify}`)
          continue
        }
        if (rep.bulkReceive !== (path === 'sealed' ? 'native' : path)) say(`   note: the destination placed pages with the ${rep.bulkReceive} path`)
        if ((rep.streams ?? 1) !== streams) say(`   note: ${rep.streams ?? 1} stream(s) granted of ${streams}`)
        const r0 = rep.rounds[0]
        const dataGiB = (rep.pages.data * rep.pageSize) / GiB
        samples.push({
          round0MiBps: r0.bytes / MiB / (r0.durationMs / 1000),
          totalMs: rep.totalMs,
          dstCpu: rep.cpuMs ? rep.cpuMs.destination / 1000 / dataGiB : NaN,
          srcCpu: rep.cpuMs ? rep.cpuMs.source / 1000 / dataGiB : NaN,
        })
      }
      results.push({ link, layout, path, streams, samples })
    }
  }

  const refBw = ref.get('7.bulk4g.copy.bw'), refDst = ref.get('7.bulk4g.copy.dst_cpu'), refSrc = ref.get('7.bulk4g.copy.src_cpu')
  // the C twin of each layout (bench/c/sparse_tcp.c): the same memory, sent and placed by plain C over loopback
  const twin = (layout, what) => ref.get(`bulk.sparse_tcp.${layout}.${what}`)?.median
  console.log(`# bench:bulk: ${mib} MiB page-store, idle, pre-copy; ${runs} run(s) per row (min / median / max); 2 vCPUs, shared`)
  console.log(`# memory: ${warmGiB} GiB warmed before the C reference and the migrations and kept warm to the end (${fmt(warmS)} s; bench/lib/warm.mjs:`)
  console.log('#   this VM backs memory lazily and takes freed 2 MiB blocks back within seconds)')
  printTable(['reference', 'unit', 'min', 'median', 'max'], [...ref.values()].filter((r) => /7\.bulk4g\.(copy|move_thp|tcp_only)\.(bw|dst_cpu|src_cpu)|bulk\.copy_runs|bulk\.sparse_tcp|bulk\.send|protect\./.test(r.id)).map((r) => [r.id, r.unit, fmt(r.min), fmt(r.median), fmt(r.max)]))
  printTable(['link', 'raw Node TCP MiB/s (min / median / max)'], Object.entries(tcp).map(([l, s]) => [l === 'netns' ? `netns, tbf ${rateMbit / 1000} Gbit/s` : l, `${fmt(s.min)} / ${fmt(s.median)} / ${fmt(s.max)}`]))
  console.log('')
  const rows = []
  const checks = []
  const mmm = (xs) => {
    const s = stats(xs)
    return xs.length ? `${fmt(s.min)} / ${fmt(s.median)} / ${fmt(s.max)}` : 'failed'
  }
  const ratio = (a, b) => (Number.isFinite(b) && b > 0 ? `x${fmt(a / b)}` : '—')
  for (const { link, layout, path, streams, samples } of results) {
    const med = (k) => stats(samples.map((x) => x[k])).median
    const col = (k) => mmm(samples.map((x) => x[k]))
    const base = link === 'loopback' ? refBw?.median * 1024 : tcp[link]?.median
    rows.push([link, layout, path, String(streams), col('round0MiBps'), ratio(med('round0MiBps'), base),
      link === 'loopback' ? ratio(med('round0MiBps'), twin(layout, 'bw') * 1024) : '—', col('dstCpu'), ratio(med('dstCpu'), refDst?.median),
      ratio(med('dstCpu'), twin(layout, 'dst_cpu')), col('srcCpu'), ratio(med('srcCpu'), refSrc?.median), col('totalMs')])
    if (path !== 'native' || !samples.length) continue
    if (link === 'loopback' && refBw) checks.push([`loopback, ${layout}, ${streams} stream(s): round 0 >= 0.8 x C 7.bulk4g.copy.bw`, `x${fmt(med('round0MiBps') / (refBw.median * 1024))}`, med('round0MiBps') >= 0.8 * refBw.median * 1024 ? 'pass' : 'FAIL'])
    if (link === 'netns' && tcp.netns) checks.push([`netns ${rateMbit / 1000} Gbit/s, ${layout}, ${streams} stream(s): round 0 >= 0.95 x raw TCP`, `x${fmt(med('round0MiBps') / tcp.netns.median)}`, med('round0MiBps') >= 0.95 * tcp.netns.median ? 'pass' : 'FAIL'])
    if (link === 'loopback' && refDst) checks.push([`loopback, ${layout}, ${streams} stream(s): destination CPU/GiB <= 1.3 x C 7.bulk4g.copy.dst_cpu`, `x${fmt(med('dstCpu') / refDst.median)}`, med('dstCpu') <= 1.3 * refDst.median ? 'pass' : 'FAIL'])
  }
  console.log('round 0 MiB/s: the first pre-copy round (every populated page once) / its duration; vs: the C reference on loopback, raw Node TCP on the shaped link')
  console.log('CPU s/GiB: each agent\'s CPU (worker thread + native threads, user + system) over the whole migration, per GiB of page data; vs: the C reference\'s receiving / sending thread')
  console.log('layout: sparse = the page-store (every 8th page never written: 7-page frames, one UFFDIO_COPY each); dense = every page written (256-page frames, as the C reference)')
  console.log('vs C twin: against bench/c/sparse_tcp.c\'s row of the same layout (the same memory sent and placed by plain C over loopback, same run)')
  printTable(['link', 'layout', 'data path', 'streams', 'round 0 MiB/s', 'vs', 'vs C twin', 'dst CPU s/GiB', 'vs C dst', 'vs C twin', 'src CPU s/GiB', 'vs C src', 'total ms'], rows)
  printTable(['target', 'measured', ''], checks)
  // what each layout allows at all: the C twin held to the same lines (a line its own C twin misses is the layout's, not the engine's)
  const twinRows = []
  for (const layout of layouts) {
    const bw = twin(layout, 'bw'), dst = twin(layout, 'dst_cpu')
    if (!bw || !refBw || !refDst) continue
    twinRows.push([`C twin, ${layout}: bw >= 0.8 x C 7.bulk4g.copy.bw`, `x${fmt(bw / refBw.median)}`, bw >= 0.8 * refBw.median ? 'meets' : 'misses'])
    twinRows.push([`C twin, ${layout}: dst CPU/GiB <= 1.3 x C 7.bulk4g.copy.dst_cpu`, `x${fmt(dst / refDst.median)}`, dst <= 1.3 * refDst.median ? 'meets' : 'misses'])
  }
  if (twinRows.length) printTable(['the same lines for the C twin of the layout', 'measured', ''], twinRows)
  const out = opt('json')
  if (out) writeFileSync(out, JSON.stringify({ references: [...ref.values()], tcp, results }, null, 2))
} finally {
  pair?.cleanup()
}
