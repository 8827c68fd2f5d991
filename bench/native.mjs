// Native-tier benchmark: the real addon against the C references of
// ../shared/limits, measured in one run on this (noisy, 2-vCPU) machine.
//
//   1. MISSING fault round trip: the main thread touches a missing page; the
//      agent (a worker_thread owning the uffd, events via uv_poll) copies it in.
//   2. UFFDIO_COPY throughput, 1/16/256/512 pages per call, cold 1 GiB source.
//   3. PAGEMAP_SCAN (the wp-async tracker's collectWritten = scan + re-protect), 1 and 8 GiB.
//   4. Guest slowdown under WP_ASYNC tracking with a scan every 100 ms:
//      a flat-out random writer (mirrors b4_wp.c bench_guest), and a guest
//      dirtying 100k pages/s that computes in between (its C twin,
//      bench/c/paced_guest.c, is built and run as that section's reference).
//   5. The trackers side by side: the paced guest at 10k and 100k pages/s
//      untracked, under wp-async and under sync-wp (the fallback for Linux
//      5.7-6.6), beside the C sync write-protect round trip (b4_wp.c sync)
//      and the C handler in the classes and placements uffdm-wp can take
//      (bench/c/sync_wp_class.c), and the C twin of the 10k row (the same
//      paced guest and tracker steps in C: bench/c/paced_guest.c TRACKER=sync-wp).
//
// Each section's C reference (../shared/limits/run SECTION) runs right after
// our own measurement of it, so that both see the machine in the same state.
// usage: node bench/native.mjs [--quick] [--json[=FILE]] [--only=rtt,copy,scan,guest,paced,trackers] [--no-ref]
//   NRUNS (default 3) runs per figure; min/median/max over runs are reported.
//   Runs are guarded against foreign CPU load like the C references
//   (QUIET_GATE seconds of waiting, MAX_RETRY retries; flagged with '*').
// Run `npx tsc -p tsconfig.json` first (uses dist/).
import { prewarm } from './lib/warm.mjs'
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads'
import { createRequire } from 'node:module'
import { once } from 'node:events'
import { writeFileSync } from 'node:fs'
import { release as osRelease } from 'node:os'
import { dirname, join } from 'node:path'
import { performance } from 'node:perf_hooks'
import { limitsScript, repoRoot, runCBench, runLimits } from './lib/limits.mjs'
import { fmt, printTable, stats } from './lib/table.mjs'
import { guarded, sleepSync } from './lib/quiet.mjs'

const require = createRequire(import.meta.url)
const dist = join(repoRoot, 'dist')
const { loadBinding } = require(join(dist, 'binding.js'))
const { Region } = require(join(dist, 'region.js'))

const GiB = 2 ** 30
const MiB = 2 ** 20
const hr = () => process.hrtime.bigint()

// ---------------------------------------------------------------------------
// workers (this same file, role picked by workerData.role)
// ---------------------------------------------------------------------------

/** The agent of the fault round trip: owns the uffd, resolves faults with UFFDIO_COPY. */
function rttAgent(wd) {
  const b = loadBinding()
  const ps = b.pageSize
  const { id, size, n } = wd
  // a source page per target page, like the C reference (82 MB, not cache-hot)
  const src = new Uint8Array(n * ps).fill(0x77)
  const T = new BigInt64Array(wd.tsab) // [touch | event | copied | resume] x n
  const uffd = new b.Uffd(0)
  uffd.register(id, 0, size, b.constants.UFFDIO_REGISTER_MODE_MISSING)
  let batches = 0, events = 0, maxBatch = 0
  uffd.startFaults((ev) => {
    const te = hr()
    batches++
    if (ev.length / 3 > maxBatch) maxBatch = ev.length / 3
    for (let i = 0; i < ev.length; i += 3) {
      const page = ev[i + 1]
      const off = page * ps
      uffd.copy(id, off, src.subarray(off, off + ps))
      if (page < n) {
        T[n + page] = te
        T[2 * n + page] = hr()
      }
      events++
    }
  })
  parentPort.on('message', (m) => {
    if (m !== 'stop') return
    uffd.close()
    parentPort.postMessage({ batches, events, maxBatch })
    parentPort.close()
  })
  parentPort.postMessage('ready')
}

// guest control block (Int32Array over a SharedArrayBuffer)
const C_STOP = 0, C_STATE = 1 // state: 0 idle, 1 running, 2 done
// guest results (Float64Array)
const R_WRITES = 0, R_T0 = 1, R_T1 = 2, R_UNITS = 3, R_TICKS = 4, R_SINK = 5, R_CHUNK_NS = 6, R_FIXED = 7, R_COMPUTE_MS = 8
const MAX_TICKS = 8192

/** One unit of "service work": integer hashing the JIT cannot drop. */
function chunk(h) {
  for (let i = 0; i < 2000; i++) h = (Math.imul(h ^ (h >>> 15), 0x2c1b3c6d) + i) | 0
  return h
}

/** The guest: random 8-byte writes to random pages of the region, in one of three modes. */
function guest(wd) {
  const region = Region.open(wd.desc)
  const f64 = new Float64Array(region.buffer)
  const np = region.pageCount
  const slots = region.pageSize / 8 // 512
  const ctl = new Int32Array(wd.ctl)
  const res = new Float64Array(wd.res)
  const batchNs = new Float64Array(wd.ticks, 0, MAX_TICKS)
  const busyNs = new Float64Array(wd.ticks, MAX_TICKS * 8, MAX_TICKS)
  const sleepCell = new Int32Array(new SharedArrayBuffer(4))
  const tickMs = wd.tickMs, perTick = wd.writesPerTick
  let sink = 0

  // calibrate the compute unit (after warming it up) for the fixed-work mode
  for (let i = 0; i < 2000; i++) sink = chunk(sink)
  let chunkMs = Infinity // best of 7: the least disturbed by other load
  for (let rep = 0; rep < 7; rep++) {
    const t = performance.now()
    for (let i = 0; i < 500; i++) sink = chunk(sink)
    chunkMs = Math.min(chunkMs, (performance.now() - t) / 500)
  }
  const fixedChunks = Math.max(1, Math.round(wd.fixedBusyMs / chunkMs))
  res[R_CHUNK_NS] = chunkMs * 1e6
  res[R_FIXED] = fixedChunks

  function flat() {
    let x = 0x9e3779b9 | 0, w = 0
    const t0 = performance.now()
    while (Atomics.load(ctl, C_STOP) === 0) {
      for (let j = 0; j < 4096; j++) {
        x ^= x << 13
        x ^= x >>> 17
        x ^= x << 5
        f64[((x >>> 9) % np) * slots + (x & 511)] = x
      }
      w += 4096
    }
    const t1 = performance.now()
    res[R_WRITES] = w
    res[R_T0] = t0
    res[R_T1] = t1
  }

  // 1000 random page writes every 10 ms; in between either compute flat out
  // ('fill': compute units per second is the guest's throughput) or do a
  // fixed amount of compute then sleep ('idle': busy time per tick).
  function paced(fill) {
    let x = 0x9e3779b9 | 0, w = 0, units = 0, k = 0, computeMs = 0
    const t0 = performance.now()
    let next = t0
    while (Atomics.load(ctl, C_STOP) === 0) {
      next += tickMs
      const a = performance.now()
      for (let j = 0; j < perTick; j++) {
        x ^= x << 13
        x ^= x >>> 17
        x ^= x << 5
        f64[((x >>> 9) % np) * slots + (x & 511)] = x
      }
      w += perTick
      const bdone = performance.now()
      if (k < MAX_TICKS) batchNs[k] = (bdone - a) * 1e6
      if (fill) {
        let e = bdone
        while ((e = performance.now()) < next) {
          sink = chunk(sink)
          units++
        }
        computeMs += e - bdone
      } else {
        for (let c = 0; c < fixedChunks; c++) sink = chunk(sink)
        units += fixedChunks
        const e = performance.now()
        if (k < MAX_TICKS) busyNs[k] = (e - a) * 1e6
        if (next > e) Atomics.wait(sleepCell, 0, 0, next - e)
      }
      k++
    }
    const t1 = performance.now()
    res[R_WRITES] = w
    res[R_T0] = t0
    res[R_T1] = t1
    res[R_UNITS] = units
    res[R_TICKS] = Math.min(k, MAX_TICKS)
    res[R_COMPUTE_MS] = computeMs
  }

  parentPort.on('message', (m) => {
    if (m.cmd === 'quit') {
      // not region.release(): that forgets the id for every thread; the
      // view goes with this worker's isolate, the main thread's stays
      parentPort.close()
      return
    }
    Atomics.store(ctl, C_STATE, 1)
    Atomics.notify(ctl, C_STATE)
    if (m.mode === 'flat') flat()
    else paced(m.mode === 'fill')
    res[R_SINK] = sink
    Atomics.store(ctl, C_STATE, 2)
    Atomics.notify(ctl, C_STATE)
  })
  parentPort.postMessage('ready')
}

if (!isMainThread) {
  if (workerData.role === 'rtt-agent') rttAgent(workerData)
  else if (workerData.role === 'guest') guest(workerData)
} else {
  await main()
}

// ---------------------------------------------------------------------------
// main thread
// ---------------------------------------------------------------------------

async function main() {
  const argv = process.argv.slice(2)
  const quick = argv.includes('--quick')
  const jsonArg = argv.find((a) => a === '--json' || a.startsWith('--json='))
  const onlyArg = argv.find((a) => a.startsWith('--only='))
  const only = onlyArg ? new Set(onlyArg.slice(7).split(',')) : null
  const want = (s) => !only || only.has(s)
  const NRUNS = Math.max(1, Number(process.env.NRUNS) || (quick ? 1 : 3))
  const t00 = Date.now()
  const log = (m) => process.stderr.write(`[${((Date.now() - t00) / 1000).toFixed(0).padStart(4)} s] ${m}\n`)

  const b = loadBinding()
  const ps = b.pageSize
  const K = b.constants
  const probe = b.probe()
  if (probe.error) {
    console.error(`userfaultfd is not usable here: ${probe.error.message}`)
    process.exit(1)
  }
  const { openTracker } = require(join(dist, 'agent', 'tracker.js'))

  const rows = [] // { section?, metric, unit, runs?, ours?, refId?, ref?, target?, info? }
  // Each section's C reference runs right after our own measurement of it:
  // this machine's speed drifts over minutes, so adjacent runs compare best.
  const refs = new Map()
  const noRef = argv.includes('--no-ref')
  const reference = (section) => {
    if (noRef) return
    for (const [k, v] of runLimits([section], { nruns: NRUNS, log })) refs.set(k, v)
  }
  const disturbedBy = {}
  const section = (title) => rows.push({ section: title })
  let lastDisturbed = 0 // of the latest runs() group, stamped on the rows that follow it
  const add = (r) => rows.push({ disturbed: lastDisturbed, ...r })

  /** NRUNS guarded runs of fn(r) -> values; returns an array of values. */
  async function runs(name, fn) {
    const out = []
    let disturbed = 0
    for (let r = 0; r < NRUNS; r++) {
      const g = await guarded(() => fn(r))
      if (g.disturbed) disturbed++
      out.push(g.value)
      log(`${name} run ${r + 1}/${NRUNS} done${g.disturbed ? ` (disturbed: foreign load ${(g.foreign * 100).toFixed(0)}%)` : ''}`)
    }
    if (disturbed) disturbedBy[name] = disturbed
    lastDisturbed = disturbed
    return out
  }
  const col = (vals, key) => vals.map((v) => v[key])

  function populate(region, val = 1) {
    const u8 = new Uint8Array(region.buffer)
    for (let off = 0; off < region.sizeBytes; off += ps) u8[off] = val
    return u8
  }
  const sumRuns = (runsArr) => {
    let s = 0
    for (let i = 1; i < runsArr.length; i += 2) s += runsArr[i]
    return s
  }

  // -------------------------------------------------------------------------
  // 1. fault round trip
  // -------------------------------------------------------------------------
  if (want('rtt')) {
    const warm = quick ? 300 : 1000
    const n = warm + (quick ? 5000 : 20000)
    log(`fault round trip: ${n - warm} faults + ${warm} warm-up per run`)
    const vals = await runs('fault-rtt', async () => {
      const region = Region.create('rtt', n * ps)
      const tsab = new SharedArrayBuffer(8 * 4 * n)
      const T = new BigInt64Array(tsab)
      const w = new Worker(new URL(import.meta.url), {
        workerData: { role: 'rtt-agent', id: region.id, size: region.sizeBytes, n, tsab },
      })
      const failed = once(w, 'error').then(([e]) => {
        throw e
      })
      await Promise.race([once(w, 'message'), failed])
      const u8 = new Uint8Array(region.buffer)
      let acc = 0
      for (let i = 0; i < n; i++) {
        const t0 = hr()
        acc += u8[i * ps]
        const t1 = hr()
        T[i] = t0
        T[3 * n + i] = t1
      }
      w.postMessage('stop')
      const [agent] = await Promise.race([once(w, 'message'), failed])
      await once(w, 'exit')
      region.release()
      if (acc !== 0x77 * n) log(`fault-rtt: read back ${acc}, expected ${0x77 * n}`)
      const m = n - warm
      const rt = new Float64Array(m), ev = new Float64Array(m), pe = new Float64Array(m)
      const cp = new Float64Array(m), wk = new Float64Array(m)
      for (let i = warm; i < n; i++) {
        const k = i - warm
        const touch = T[i], event = T[n + i], copied = T[2 * n + i], resume = T[3 * n + i]
        rt[k] = Number(resume - touch) / 1e3
        ev[k] = Number(event - touch) / 1e3
        pe[k] = Number(resume - event) / 1e3
        cp[k] = Number(copied - event) / 1e3
        wk[k] = Number(resume - copied) / 1e3
      }
      const s = stats(rt)
      return {
        p50: s.p50, p99: s.p99, mean: s.mean,
        ev50: stats(ev).p50, pe50: stats(pe).p50, cp50: stats(cp).p50, wk50: stats(wk).p50,
        ev99: stats(ev).p99, pe99: stats(pe).p99,
        batches: agent.batches, events: agent.events, maxBatch: agent.maxBatch,
      }
    })
    section('1. MISSING fault round trip (main thread touches, worker agent copies; unpinned)')
    const ref = (s) => `3a.fault_rtt.read.none.${s}`
    add({ metric: 'fault RTT p50', unit: 'µs', runs: col(vals, 'p50'), refId: ref('p50'), target: { maxRatio: 1.5 } })
    add({ metric: 'fault RTT p99', unit: 'µs', runs: col(vals, 'p99'), refId: ref('p99'), target: { maxRatio: 2 } })
    add({ metric: 'fault RTT p50 vs best C wake mode', unit: 'µs', runs: col(vals, 'p50'), refBest: 'p50', info: true })
    add({ metric: 'fault RTT p99 vs best C wake mode', unit: 'µs', runs: col(vals, 'p99'), refBest: 'p99', info: true })
    add({ metric: 'fault RTT mean', unit: 'µs', runs: col(vals, 'mean'), refId: ref('mean'), info: true })
    add({ metric: '  touch → callback entry p50', unit: 'µs', runs: col(vals, 'ev50'), refId: ref('p50.deliver'), info: true })
    add({ metric: '  callback entry → resumed p50', unit: 'µs', runs: col(vals, 'pe50'), refId: ref('p50.after_event'), info: true })
    add({ metric: '    of which copy() call p50', unit: 'µs', runs: col(vals, 'cp50'), info: true })
    add({ metric: '    of which copy() return → resumed p50', unit: 'µs', runs: col(vals, 'wk50'), info: true })
    add({ metric: '  touch → callback entry p99', unit: 'µs', runs: col(vals, 'ev99'), info: true })
    add({ metric: '  callback entry → resumed p99', unit: 'µs', runs: col(vals, 'pe99'), info: true })
    add({ metric: '  events per callback (mean)', unit: '', runs: vals.map((v) => v.events / v.batches), info: true })
  }

  if (want('rtt')) reference('fault-rtt')

  // -------------------------------------------------------------------------
  // 2. UFFDIO_COPY throughput
  // -------------------------------------------------------------------------
  if (want('copy')) {
    const len = quick ? 256 * MiB : 1 * GiB
    log(`UFFDIO_COPY: ${len / MiB} MiB per run from a cold source`)
    const src = Buffer.allocUnsafeSlow(len).fill(0x42) // populated, 'cache-cold' at the start of each run
    section(`2. UFFDIO_COPY throughput, ${len / MiB} MiB into a MISSING-registered region, cold ${len / MiB} MiB source`)
    for (const batch of [1, 16, 256, 512]) {
      const blen = batch * ps
      const uffd = new b.Uffd(0)
      const vals = await runs(`copy ${batch}p`, () => {
        prewarm(len)
        const region = Region.create('copy', len)
        uffd.register(region.id, 0, len, K.UFFDIO_REGISTER_MODE_MISSING)
        const id = region.id
        const t0 = hr()
        for (let off = 0; off < len; off += blen) uffd.copy(id, off, src.subarray(off, off + blen))
        const t1 = hr()
        const u8 = new Uint8Array(region.buffer)
        if (u8[0] !== 0x42 || u8[len - 1] !== 0x42) log(`copy ${batch}p: verify failed`)
        uffd.unregister(region.id, 0, len)
        region.release()
        const secs = Number(t1 - t0) / 1e9
        return { gibs: len / GiB / secs, nsPage: (secs * 1e9) / (len / ps) }
      })
      uffd.close()
      add({
        metric: `copy ${batch} page${batch > 1 ? 's' : ''}/call${batch === 512 ? ' (2 MiB)' : ''}`, unit: 'GiB/s',
        runs: col(vals, 'gibs'), refId: `3b.copy.${batch}p`, higherBetter: true,
        target: batch === 256 ? { minRatio: 0.8 } : undefined, info: batch !== 256,
      })
      add({ metric: `  ns per page, ${batch}/call`, unit: 'ns', runs: col(vals, 'nsPage'), refId: `3b.copy.${batch}p.ns`, info: true })
    }
  }

  if (want('copy')) reference('copy')

  // -------------------------------------------------------------------------
  // 3. PAGEMAP_SCAN via DirtyTracker.collectWritten
  // -------------------------------------------------------------------------
  if (want('scan')) {
    section('3. PAGEMAP_SCAN + re-protect: DirtyTracker.collectWritten over a populated WP_ASYNC region')
    const sizes = quick ? [1] : [1, 8]
    for (const gib of sizes) {
      const len = gib * GiB
      // A region's ArrayBuffer can be at most 4 GiB on Node 20 (a larger
      // regionCreate aborts the process), so 8 GiB is tracked as 2 x 4 GiB.
      const partLen = Math.min(len, 4 * GiB)
      const nparts = len / partLen
      log(`scan ${gib} GiB: prewarm + populate${nparts > 1 ? ` (${nparts} regions of ${partLen / GiB} GiB)` : ''}`)
      prewarm(len)
      let parts = Array.from({ length: nparts }, (_, i) => Region.create(`scan${i}`, partLen))
      let u8s = parts.map((r) => populate(r))
      let tracker = openTracker(b, parts, 'wp-async')
      const collectAll = () => {
        let pages = 0
        for (const r of parts) pages += sumRuns(tracker.collectWritten(r.id, r.pageCount))
        return pages
      }
      for (const pct of [0, 1]) {
        const vals = await runs(`scan ${gib}g ${pct}%`, (r) => {
          // Re-arm: write-protect everything (untimed), as the C reference does
          // before each run. Same ioctl as DirtyTracker's constructor; it also
          // leaves the page tables cache-warm, which halves a 1 GiB scan that
          // follows the 200 ms idle of the quiet gate - so, like for like.
          for (const r of parts) tracker.uffd.writeProtect(r.id, 0, r.sizeBytes, true)
          const seed = (0x1234567 * (r + 1) + pct) | 0
          let k = 0
          for (let p = 0; p < parts.length; p++) {
            const u8 = u8s[p], np = parts[p].pageCount, base = p * np
            for (let i = 0; i < np; i++) {
              let h = Math.imul((base + i + 1) ^ seed, 0x9e3779b1)
              h ^= h >>> 15
              h = Math.imul(h, 0x85ebca6b)
              h ^= h >>> 13
              if ((h >>> 0) % 1000 < pct * 10) {
                u8[i * ps + 128] = r
                k++
              }
            }
          }
          // read-only scan first (no re-protect), as the C reference does
          const W = K.PAGE_IS_WRITTEN
          const r0 = hr()
          let gotRo = 0
          for (const r of parts) gotRo += sumRuns(b.pagemapScan(r.id, 0, r.pageCount, 0, W, 0, 0, W))
          const t0 = hr()
          const got = collectAll()
          const t1 = hr()
          if (got !== k || gotRo !== k) log(`scan ${gib}g ${pct}%: wrote ${k} pages, scans found ${gotRo} (read-only), ${got}`)
          const again = collectAll()
          if (again) log(`scan ${gib}g ${pct}%: ${again} pages still written after a WP_MATCHING scan`)
          return { wp: Number(t1 - t0) / 1e6, ro: Number(t0 - r0) / 1e6 }
        })
        const oneGiB = gib === 1
        add({
          metric: `scan ${gib} GiB${nparts > 1 ? ` (${nparts}×${partLen / GiB} GiB regions)` : ''}, ${pct}% written`, unit: 'ms',
          runs: col(vals, 'wp'), refId: `4b.scan_wp.${gib}g.${pct}pct`,
          target: oneGiB ? { maxAbs: 5, maxRatio: 1.5 } : undefined, info: !oneGiB,
        })
        add({ metric: `  read-only scan (no re-protect), ${pct}%`, unit: 'ms', runs: col(vals, 'ro'), refId: `4b.scan_ro.${gib}g.${pct}pct`, info: true })
      }
      tracker.close()
      for (const r of parts) r.release()
      tracker = parts = u8s = null
    }
  }

  if (want('scan')) reference('wp-scan')

  // -------------------------------------------------------------------------
  // 4. guest slowdown under tracking
  // -------------------------------------------------------------------------
  const guestLen = quick ? 256 * MiB : 1 * GiB
  const secs = quick ? 1 : 3
  let guestRegion = null
  async function withGuest(opts, body) {
    if (!guestRegion) {
      guestRegion = Region.create('guest', guestLen)
      populate(guestRegion)
    }
    const ctl = new Int32Array(new SharedArrayBuffer(8))
    const resSab = new SharedArrayBuffer(8 * 16)
    const res = new Float64Array(resSab)
    const ticks = new SharedArrayBuffer(8 * 2 * MAX_TICKS)
    const w = new Worker(new URL(import.meta.url), {
      workerData: { role: 'guest', desc: guestRegion.describe(), ctl: ctl.buffer, res: resSab, ticks, ...opts },
    })
    const failed = once(w, 'error').then(([e]) => {
      throw e
    })
    await Promise.race([once(w, 'message'), failed])
    const batchNs = new Float64Array(ticks, 0, MAX_TICKS)
    const busyNs = new Float64Array(ticks, MAX_TICKS * 8, MAX_TICKS)
    /** One phase: the guest runs for `s` seconds; if track (true = wp-async, or a tracker kind), scans every 100 ms meanwhile. */
    const phase = (mode, track, s) => {
      Atomics.store(ctl, C_STOP, 0)
      Atomics.store(ctl, C_STATE, 0)
      const tracker = track ? openTracker(b, [guestRegion], track === true ? 'wp-async' : track) : null
      w.postMessage({ mode })
      while (Atomics.load(ctl, C_STATE) === 0) Atomics.wait(ctl, C_STATE, 0, 1000)
      const start = performance.now()
      const end = start + s * 1000
      let next = start, scans = 0, pages = 0, scanMs = 0, scanMax = 0
      const np = guestRegion.pageCount, id = guestRegion.id
      for (;;) {
        next += 100
        sleepSync(Math.min(next, end) - performance.now())
        if (performance.now() >= end) break
        if (!tracker) continue
        const t0 = performance.now()
        pages += sumRuns(tracker.collectWritten(id, np))
        const dt = performance.now() - t0
        scans++
        scanMs += dt
        if (dt > scanMax) scanMax = dt
      }
      Atomics.store(ctl, C_STOP, 1)
      while (Atomics.load(ctl, C_STATE) !== 2) Atomics.wait(ctl, C_STATE, 1, 1000)
      const trackerCpuMs = tracker?.cpuMs ?? 0, cpuMoves = tracker?.cpuMoves ?? 0, starved = tracker?.starved ?? 0
      const collectsMoved = tracker?.collectsMoved ?? 0
      tracker?.close()
      const runMs = res[R_T1] - res[R_T0]
      const nt = res[R_TICKS]
      return {
        faults: tracker?.faults ?? 0, trackerCpuMs, cpuMoves, starved, collectsMoved,
        writes: res[R_WRITES], runMs, units: res[R_UNITS], scans, pages,
        scanMean: scans ? scanMs / scans : 0, scanMax,
        batch: nt ? stats(batchNs.subarray(0, nt)) : null,
        busy: nt ? stats(busyNs.subarray(0, nt)) : null,
        chunkNs: res[R_CHUNK_NS], fixedChunks: res[R_FIXED], computeMs: res[R_COMPUTE_MS],
      }
    }
    try {
      return await body(phase)
    } finally {
      w.postMessage({ cmd: 'quit' })
      await once(w, 'exit')
    }
  }

  if (want('guest')) {
    log(`guest flat out: ${guestLen / MiB} MiB, ${secs} s untracked + ${secs} s tracked per run`)
    const vals = await withGuest({ tickMs: 10, writesPerTick: 1000, fixedBusyMs: 4 }, async (phase) => {
      phase('flat', false, 0.5) // warm-up (JIT)
      return runs('guest flat', () => {
        const u = phase('flat', false, secs)
        const t = phase('flat', true, secs)
        const untracked = u.writes / u.runMs / 1e3 // Mwrites/s
        const tracked = t.writes / t.runMs / 1e3
        const nsPerWrite = 1e3 / untracked
        const perDirty = t.pages ? (t.runMs * 1e6 - t.writes * nsPerWrite) / t.pages : 0
        return {
          untracked, tracked, ratio: untracked / tracked, perDirty,
          scanMean: t.scanMean, scanMax: t.scanMax, dirty: t.scans ? t.pages / t.scans : 0,
        }
      })
    })
    section(`4. guest: random 8-byte writes to random pages of ${guestLen / MiB} MiB, flat out, WP_ASYNC + scan every 100 ms`)
    const g = (s) => `4c.guest.1g.${s}`
    add({ metric: 'guest untracked', unit: 'Mwrites/s', runs: col(vals, 'untracked'), refId: g('untracked'), higherBetter: true, info: true })
    add({ metric: 'guest tracked', unit: 'Mwrites/s', runs: col(vals, 'tracked'), refId: g('tracked'), higherBetter: true, info: true })
    add({ metric: 'guest slowdown untracked/tracked', unit: 'x', runs: col(vals, 'ratio'), refId: g('slowdown'), info: true })
    add({ metric: 'guest ns lost per dirty page', unit: 'ns', runs: col(vals, 'perDirty'), refId: g('ns_per_dirty_page'), target: { maxRatio: 1.2 } })
    add({ metric: '  scan during guest, mean', unit: 'ms', runs: col(vals, 'scanMean'), refId: g('scan_ms'), info: true })
    add({ metric: '  scan during guest, max', unit: 'ms', runs: col(vals, 'scanMax'), refId: g('scan_max_ms'), info: true })
    add({ metric: '  dirty pages per scan', unit: 'pages', runs: col(vals, 'dirty'), refId: g('dirty_per_scan'), higherBetter: true, info: true })
  }

  if (want('guest')) {
    guestRegion?.release() // the C reference maps its own 1 GiB and 4 GiB
    guestRegion = null
    reference('wp-guest')
  }

  if (want('paced')) {
    log(`paced guest: 100k pages/s (1000 per 10 ms), ${secs} s untracked + ${secs} s tracked per run, two modes`)
    const opts = { tickMs: 10, writesPerTick: 1000, fixedBusyMs: 4 }
    let chunkNs = 0, fixedChunks = 0
    const vals = await withGuest(opts, async (phase) => {
      phase('fill', false, 0.5) // warm-up (JIT)
      phase('idle', false, 0.3)
      return runs('guest paced', () => {
        const fu = phase('fill', false, secs)
        const ft = phase('fill', true, secs)
        const iu = phase('idle', false, secs)
        const it = phase('idle', true, secs)
        chunkNs = it.chunkNs
        fixedChunks = it.fixedChunks
        const rate = (p) => p.units / p.runMs // compute units per ms
        const speed = (p) => p.units / p.computeMs // compute units per ms of compute time
        return {
          fillLoss: (1 - rate(ft) / rate(fu)) * 100,
          share: ((ft.batch.mean - fu.batch.mean) / 1e6 / opts.tickMs) * 100,
          speedLost: (1 - speed(ft) / speed(fu)) * 100,
          batchMeanU: fu.batch.mean / 1e3, batchMeanT: ft.batch.mean / 1e3,
          pagesPerSec: ft.writes / ft.runMs * 1e3,
          batchU: fu.batch.median / 1e3, batchT: ft.batch.median / 1e3, batchT99: ft.batch.p99 / 1e3,
          perPage: (ft.batch.median - fu.batch.median) / opts.writesPerTick,
          idleSlow: (it.busy.mean / iu.busy.mean - 1) * 100,
          busyU: iu.busy.median / 1e3, busyU99: iu.busy.p99 / 1e3, busyT: it.busy.median / 1e3, busyT99: it.busy.p99 / 1e3,
          dirty: ft.scans ? ft.pages / ft.scans : 0,
        }
      })
    })
    section('4b. guest dirtying 100k random pages/s (1000 writes per 10 ms tick) + compute; reference: C twin bench/c/paced_guest.c')
    const p = (s) => `4d.paced.1g.${s}`
    add({
      metric: 'paced, compute fills the ticks: compute/s lost', unit: '%', runs: col(vals, 'fillLoss'), refId: p('compute_lost'),
      target: { maxAbs: 10 },
    })
    add({ metric: '  of which extra time in write batches', unit: '%', runs: col(vals, 'share'), refId: p('batch_share'), info: true })
    add({ metric: '  compute speed lost (outside the writes)', unit: '%', runs: col(vals, 'speedLost'), refId: p('compute_speed_lost'), info: true })
    add({ metric: '  1000-write batch untracked, mean', unit: 'µs', runs: col(vals, 'batchMeanU'), refId: p('batch_us.untracked'), info: true })
    add({ metric: '  1000-write batch tracked, mean', unit: 'µs', runs: col(vals, 'batchMeanT'), refId: p('batch_us.tracked'), info: true })
    add({ metric: '  1000-write batch tracked, median', unit: 'µs', runs: col(vals, 'batchT'), info: true })
    add({ metric: '  1000-write batch tracked, p99', unit: 'µs', runs: col(vals, 'batchT99'), info: true })
    add({ metric: '  extra per tracked write (batch medians)', unit: 'ns', runs: col(vals, 'perPage'), info: true })
    add({ metric: '  dirty pages per scan', unit: 'pages', runs: col(vals, 'dirty'), refId: p('dirty_per_scan'), info: true })
    add({
      metric: `paced, fixed work then idle: busy time +`, unit: '%', runs: col(vals, 'idleSlow'), info: true,
      note: `fixed work = 1000 writes + ${fixedChunks} compute units (${fmt((fixedChunks * chunkNs) / 1e6)} ms) per 10 ms tick`,
    })
    add({ metric: '  busy per tick untracked, median', unit: 'µs', runs: col(vals, 'busyU'), info: true })
    add({ metric: '  busy per tick untracked, p99', unit: 'µs', runs: col(vals, 'busyU99'), info: true })
    add({ metric: '  busy per tick tracked, median', unit: 'µs', runs: col(vals, 'busyT'), info: true })
    add({ metric: '  busy per tick tracked, p99', unit: 'µs', runs: col(vals, 'busyT99'), info: true })
  }
  // -------------------------------------------------------------------------
  // 5. the trackers side by side (issue 13): the paced guest at 10k and 100k
  //    random pages/s, untracked, wp-async and sync-wp, scans every 100 ms
  // -------------------------------------------------------------------------
  if (want('trackers')) {
    const kinds = ['wp-async', 'sync-wp']
    let syncLost10k = null // sync-wp's compute lost at 10k pages/s (runs), held against the C floor below
    let syncPerWrite10k = null // and its extra time per write
    for (const perSec of [10_000, 100_000]) {
      const perTick = perSec / 100
      log(`trackers: paced guest ${perSec / 1000}k pages/s (${perTick} per 10 ms), ${secs} s per phase: untracked, ${kinds.join(', ')}`)
      const vals = await withGuest({ tickMs: 10, writesPerTick: perTick, fixedBusyMs: 4 }, async (phase) => {
        phase('fill', false, 0.5) // warm-up (JIT)
        return runs(`trackers ${perSec / 1000}k`, () => {
          const u = phase('fill', false, secs)
          const rate = (p) => p.units / p.runMs
          const out = {}
          for (const kind of kinds) {
            const t = phase('fill', kind, secs)
            out[`${kind}.lost`] = (1 - rate(t) / rate(u)) * 100
            out[`${kind}.perWrite`] = ((t.batch.mean - u.batch.mean) / perTick) / 1e3 // µs per write (each to a new page)
            out[`${kind}.dirty`] = t.scans ? t.pages / t.scans : 0
            out[`${kind}.faultsPerSec`] = (t.faults / t.runMs) * 1e3
            out[`${kind}.cpuPerFault`] = t.faults ? (t.trackerCpuMs * 1e3) / t.faults : 0
            out[`${kind}.movesPerSec`] = (t.cpuMoves / t.runMs) * 1e3
            out[`${kind}.starved`] = t.starved
            out[`${kind}.collectsMoved`] = t.scans ? (100 * t.collectsMoved) / t.scans : 0
            out[`${kind}.scanMean`] = t.scanMean
          }
          return out
        })
      })
      if (perSec === 10_000) syncLost10k = col(vals, 'sync-wp.lost'), syncPerWrite10k = col(vals, 'sync-wp.perWrite')
      section(`5. trackers: guest writing ${perSec / 1000}k random pages/s of ${guestLen / MiB} MiB (${perTick} writes per 10 ms tick, compute fills the rest), a collect every 100 ms`)
      const id = (s) => `5.trackers.${perSec / 1000}k.${s}`
      for (const kind of kinds) {
        add({
          metric: `${kind}: compute/s lost`, unit: '%', runs: col(vals, `${kind}.lost`), refId: id(`${kind}.lost`),
          ...(perSec === 10_000 ? { target: { maxAbs: 10 } } : { info: true }),
        })
        add({
          metric: `  extra time per dirtying write`, unit: 'µs', runs: col(vals, `${kind}.perWrite`), info: true,
          refId: kind === 'sync-wp' ? '4a.wp_sync.poll.same.mean' : undefined,
        })
        add({ metric: `  pages per collect`, unit: 'pages', runs: col(vals, `${kind}.dirty`), info: true })
        add({ metric: `  collect (take + re-protect), mean`, unit: 'ms', runs: col(vals, `${kind}.scanMean`), info: true })
        if (kind === 'sync-wp') {
          add({ metric: `  write faults resolved by uffdm-wp`, unit: '/s', runs: col(vals, `${kind}.faultsPerSec`), info: true })
          // the thread's own CPU per fault, and how often it moved to follow the writer: a writer the scheduler keeps
          // moving (woken onto the idle vCPU while this thread still runs on its own) makes round trips cross CPUs
          add({ metric: `  uffdm-wp CPU per fault`, unit: 'µs', runs: col(vals, `${kind}.cpuPerFault`), info: true })
          add({ metric: `  uffdm-wp moves to the writer's CPU`, unit: '/s', runs: col(vals, `${kind}.movesPerSec`), info: true })
          // SCHED_IDLE keeps the woken writer on its CPU; other work there starves it, and its guard moves it back
          add({ metric: `  uffdm-wp starved in the idle class (guard)`, unit: 'times', runs: col(vals, `${kind}.starved`), info: true })
          // a collect's re-protect walks thousands of pages: off the writer's CPU, so that its faults do not wait behind it
          add({ metric: `  collects re-protected off the writer's CPU`, unit: '%', runs: col(vals, `${kind}.collectsMoved`), info: true })
        }
      }
    }
    if (!noRef) {
      // the sync write-protect round trip in C (same CPU / split CPUs / spinning handler): the floor of sync-wp
      const b4 = join(dirname(limitsScript()), 'b4_wp.c')
      for (const [k, v] of runCBench(b4, { nruns: NRUNS, args: ['sync'], log })) refs.set(k, v)
      section('5c. C reference: sync write-protect fault round trip (b4_wp.c sync), µs')
      for (const p of ['poll.same', 'poll.split', 'spin.split']) {
        add({ metric: `C handler, ${p.replace('.', ', ')}: p50`, unit: 'µs', runs: [refs.get(`4a.wp_sync.${p}.p50`)?.median ?? NaN], refId: `4a.wp_sync.${p}.p50`, info: true })
      }
      // the handler's class and placement as uffdm-wp can choose them, the writer not pinned (bench/c/sync_wp_class.c)
      for (const [k, v] of runCBench(join(repoRoot, 'bench', 'c', 'sync_wp_class.c'), { nruns: NRUNS, log })) refs.set(k, v)
      section('5d. C reference: the handler\'s class, writer not pinned, faulting back to back (bench/c/sync_wp_class.c)')
      for (const [m, label] of [['follow', 'follows the writer, normal class'], ['idle_follow', 'follows the writer, SCHED_IDLE (uffdm-wp)'], ['pinned', 'pinned with the writer to one CPU (the floor)']]) {
        const mean = refs.get(`wp_class.${m}.mean`), moves = refs.get(`wp_class.${m}.writer_moves`)
        add({ metric: `C handler ${label}: mean`, unit: 'µs', runs: [mean?.median ?? NaN], refId: `wp_class.${m}.mean`, info: true })
        add({ metric: `  writer's CPU changes`, unit: 'moves', runs: [moves?.median ?? NaN], info: true })
      }
      // the fault resolved by the writer itself (UFFD_FEATURE_SIGBUS): cheaper than any handler thread, but a kernel-mode
      // write into a protected page then fails with EFAULT instead of waiting, so the sync-wp tracker does not use it
      for (const [k, v] of runCBench(join(repoRoot, 'bench', 'c', 'wp_sigbus.c'), { nruns: NRUNS, log })) refs.set(k, v)
      const sigbus = refs.get('wp_sigbus.mean'), errnoKernel = refs.get('wp_sigbus.kernel_write_errno')
      add({ metric: 'C, the writer resolves its own fault (SIGBUS mode): mean', unit: 'µs', runs: [sigbus?.median ?? NaN], refId: 'wp_sigbus.mean', info: true,
        note: `not used: read(2) into a protected page then fails (errno ${errnoKernel?.median ?? '?'}${errnoKernel?.median === 14 ? ', EFAULT' : ''}) instead of waiting; x 10k faults/s = ${fmt(((sigbus?.median ?? NaN) * 1e4) / 1e6 * 100)} % of each second` })
      // the C twin of this section's 10k row: the same paced guest and the same tracker steps in C (bench/c/paced_guest.c
      // TRACKER=sync-wp), its handler and collector placed as uffdm-wp places them, then pinned apart (the floor)
      section('5e. C twin of the 10k row: paced guest + sync-wp handler + a collect every 100 ms (bench/c/paced_guest.c), same machine, same warm memory')
      const twinEnv = { PER_TICK: '100', TRACKER: 'sync-wp', ...(quick ? { MIB: String(guestLen / MiB), SECS: String(secs) } : {}) }
      for (const [place, label] of [['idle', 'handler SCHED_IDLE following the writer, collect off its CPU (uffdm-wp\'s placement)'], ['pinned', 'writer + handler pinned to one CPU, collector to the other (the floor)']]) {
        for (const [k, v] of runCBench(join(repoRoot, 'bench', 'c', 'paced_guest.c'), { nruns: NRUNS, env: { ...twinEnv, PLACE: place }, log })) refs.set(k, v)
        add({ metric: `C twin, ${label}: compute/s lost`, unit: '%', runs: [refs.get(`5e.paced_sync.${place}.compute_lost`)?.median ?? NaN], refId: `5e.paced_sync.${place}.compute_lost`, info: true })
        add({ metric: `  extra time per dirtying write`, unit: 'µs', runs: [refs.get(`5e.paced_sync.${place}.us_per_write`)?.median ?? NaN], refId: `5e.paced_sync.${place}.us_per_write`, info: true })
      }
      if (syncLost10k) {
        add({ metric: 'sync-wp: compute/s lost at 10k pages/s, against its C twin', unit: '%', runs: syncLost10k, refId: '5e.paced_sync.idle.compute_lost', info: true })
        add({ metric: '  extra time per dirtying write, against its C twin', unit: 'µs', runs: syncPerWrite10k, refId: '5e.paced_sync.idle.us_per_write', info: true })
      }
      // the least a sync round trip per first write costs the guest here: the pinned handler's mean, 10k times a second
      const pinned = refs.get('wp_class.pinned.mean')
      if (pinned && syncLost10k) {
        const floorPct = (pinned.median * 1e4) / 1e6 * 100
        refs.set('wp_class.floor_10k_pct', { ...pinned, id: 'wp_class.floor_10k_pct', unit: '%', median: floorPct })
        add({
          metric: 'sync-wp: compute/s lost at 10k pages/s, against the C floor', unit: '%', runs: syncLost10k, refId: 'wp_class.floor_10k_pct', info: true,
          note: `C floor: the pinned handler's mean round trip x 10k faults/s = ${fmt(floorPct)} % of each second; ${floorPct > 10 ? 'over 10 %: the <= 10 % line is below what this machine allows' : 'within 10 %'}`,
        })
      }
    }
  }

  if (guestRegion) {
    guestRegion.release()
    guestRegion = null
  }

  // -------------------------------------------------------------------------
  // references, then the table
  // -------------------------------------------------------------------------
  if (want('paced') && !noRef) {
    const env = quick ? { MIB: String(guestLen / MiB), SECS: String(secs) } : {}
    for (const [k, v] of runCBench(join(repoRoot, 'bench', 'c', 'paced_guest.c'), { nruns: NRUNS, env, log })) refs.set(k, v)
  }

  let bestMode = {}
  for (const p of ['p50', 'p99']) {
    let best = null
    for (const m of ['read', 'poll', 'epoll']) {
      const r50 = refs.get(`3a.fault_rtt.${m}.none.p50`)
      if (r50 && (!best || r50.median < best.p50)) best = { mode: m, p50: r50.median }
    }
    if (best) bestMode[p] = { id: `3a.fault_rtt.${best.mode}.none.${p}`, mode: best.mode }
  }

  const table = []
  const json = []
  let failed = 0
  for (const r of rows) {
    if (r.section) {
      table.push(r.section)
      continue
    }
    const s = stats(r.runs)
    const refId = r.refBest ? bestMode[r.refBest]?.id : r.refId
    const ref = refId ? refs.get(refId) : undefined
    const refMed = ref?.median
    const ratio = refMed ? s.median / refMed : undefined
    const t = r.target
    let targetText = r.info ? 'info' : '', pass = ''
    if (t) {
      const parts = []
      if (t.maxAbs !== undefined) parts.push(`≤${t.maxAbs}${r.unit === '%' ? '' : ' '}${r.unit}`)
      if (t.maxRatio !== undefined) parts.push(`≤${t.maxRatio}× ref`)
      if (t.minRatio !== undefined) parts.push(`≥${t.minRatio}× ref`)
      targetText = parts.join(' & ')
      const checks = []
      if (t.maxAbs !== undefined) checks.push(s.median <= t.maxAbs)
      if (t.maxRatio !== undefined) checks.push(ratio === undefined ? null : ratio <= t.maxRatio)
      if (t.minRatio !== undefined) checks.push(ratio === undefined ? null : ratio >= t.minRatio)
      if (checks.includes(false)) {
        pass = 'FAIL'
        failed++
      } else if (checks.includes(null)) pass = 'no ref'
      else pass = 'pass'
    }
    const disturbed = r.disturbed > 0
    const metric = `${r.metric}${r.unit ? ` (${r.unit})` : ''}${r.refBest && bestMode[r.refBest] ? ` [${bestMode[r.refBest].mode}]` : ''}`
    table.push([
      metric + (disturbed ? '*' : ''),
      `${fmt(s.min)} / ${fmt(s.median)} / ${fmt(s.max)}`,
      refMed === undefined ? (refId ? '—' : '') : fmt(refMed),
      ratio === undefined ? '' : `${fmt(ratio)}x`,
      targetText,
      pass,
    ])
    if (r.note) table.push(`    (${r.note})`)
    json.push({
      metric: r.metric, unit: r.unit, runs: r.runs, min: s.min, median: s.median, max: s.max,
      refId, ref: ref ?? null, ratio: ratio ?? null, target: t ?? null, pass: pass || null, note: r.note,
    })
  }

  console.log(
    `\nuffd-migrate native benchmark — node ${process.version}, Linux ${osRelease()}, ${NRUNS} run(s) per figure` +
      `${quick ? ', QUICK sizes' : ''}; ours = min / median / max over runs; reference = C median (../shared/limits)\n`,
  )
  printTable(['metric', 'ours (min / median / max)', 'reference (median)', 'ratio', 'target', 'pass?'], table, {
    align: ['l', 'r', 'r', 'r', 'l', 'l'],
  })
  const dist_ = Object.entries(disturbedBy)
  if (dist_.length)
    console.log(`\n* runs kept despite foreign CPU load (>5% of the machine): ${dist_.map(([k, v]) => `${k} ${v}/${NRUNS}`).join(', ')}`)
  const refDisturbed = [...refs.values()].filter((r) => /runs disturbed/.test(r.description))
  if (refDisturbed.length) console.log(`reference figures with disturbed runs: ${refDisturbed.map((r) => r.id).join(', ')}`)
  console.log(`\n${failed ? `${failed} target(s) FAILED` : 'all checked targets met'}; total ${((Date.now() - t00) / 1000).toFixed(0)} s`)

  if (jsonArg) {
    const doc = JSON.stringify(
      { node: process.version, kernel: osRelease(), nruns: NRUNS, quick, rows: json, disturbed: disturbedBy, refs: Object.fromEntries(refs) },
      null,
      2,
    )
    if (jsonArg.startsWith('--json=')) writeFileSync(jsonArg.slice(7), doc + '\n')
    else console.log(doc)
  }
}
