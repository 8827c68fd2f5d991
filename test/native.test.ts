import { Worker } from 'node:worker_threads'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { loadBinding } from '../src/binding'
import { Region } from '../src/region'
import { openTracker } from '../src/agent/tracker'
import { kernelSkipReason } from './helpers/gate'
import { missingRegion } from './helpers/uffd-region'

const skip = kernelSkipReason()
const dist = join(__dirname, '..', 'dist')

/** A worker that opens the region and runs `body` (JS source) with `u8` bound to it. */
function inWorker<T>(desc: object, body: string, extra: object = {}): Promise<T> {
  const src = `
    const { parentPort, workerData } = require('node:worker_threads')
    const { Region } = require(${JSON.stringify(join(dist, 'region.js'))})
    const region = Region.open(workerData.desc)
    const u8 = new Uint8Array(region.buffer)
    const out = (() => { ${body} })()
    parentPort.postMessage(out)`
  return new Promise((resolve, reject) => {
    const w = new Worker(src, { eval: true, workerData: { desc, ...extra } })
    w.once('message', (m) => {
      resolve(m as T)
      void w.terminate()
    })
    w.once('error', reject)
  })
}

describe.skipIf(skip)('native addon on the real kernel', () => {
  const b = skip ? (undefined as never) : loadBinding()
  const ps = skip ? 4096 : b.pageSize
  const MISSING = skip ? 0 : b.constants.UFFDIO_REGISTER_MODE_MISSING


  it('resolves a worker fault with copy and the worker reads the copied bytes', async () => {
    const { region, uffd } = missingRegion(b, 16)
    const faults: number[] = []
    uffd.startFaults((ev) => {
      for (let i = 0; i < ev.length; i += 3) {
        expect(ev[i]).toBe(region.id)
        faults.push(ev[i + 1])
        uffd.copy(region.id, ev[i + 1] * ps, new Uint8Array(ps).fill(ev[i + 1] + 1))
      }
    })
    const got = await inWorker<number[]>(region.describe(), `return [u8[3 * ${ps}], u8[3 * ${ps} + ${ps - 1}], u8[9 * ${ps} + 7]]`)
    expect(got).toEqual([4, 4, 10])
    expect(faults.sort((a, b) => a - b)).toEqual([3, 9])
    uffd.close()
    region.release()
  })

  it('a held descriptor outlives its object and another adopts it: a fault read and dropped is raised again by a wake', async () => {
    // (a destination's agent that crashed, and the one that takes over: src/agent/destination/takeover.ts)
    const { region, uffd } = missingRegion(b, 8)
    const held = uffd.holdRegistrations!()
    expect(held).toBeGreaterThan(2)
    let dropped = 0
    uffd.startFaults((ev) => void (dropped += ev.length / 3)) // the crashed agent read the fault, never answered it
    const read = inWorker<number>(region.describe(), `return u8[5 * ${ps} + 1]`)
    await new Promise((r) => setTimeout(r, 200))
    expect(dropped).toBe(1)
    const { features, ioctls } = uffd
    ;(uffd as unknown as { stopFaults(): void }).stopFaults() // (never close()d: that closes the held descriptor too)
    const next = new b.Uffd(features, held, ioctls)
    expect([next.fd, next.features, next.ioctls]).toEqual([held, features, ioctls])
    next.startFaults((ev) => {
      for (let i = 0; i < ev.length; i += 3) next.copy(region.id, ev[i + 1] * ps, new Uint8Array(ps).fill(77))
    })
    next.wake(region.id, 0, region.sizeBytes) // the blocked thread faults again, into the new reader
    expect(await read).toBe(77)
    next.close()
    region.release()
    expect(() => new b.Uffd(0, 1, 0)).toThrow(/expected adoptFd to be an open userfaultfd \(1 is not\)/)
  })

  it('pollFaults() delivers a queued fault synchronously, while this thread never yields to its loop', async () => {
    const { region, uffd } = missingRegion(b, 8)
    const faults: number[] = []
    uffd.startFaults((ev) => {
      for (let i = 0; i < ev.length; i += 3) {
        faults.push(ev[i + 1])
        uffd.copy(region.id, ev[i + 1] * ps, new Uint8Array(ps).fill(42))
      }
    })
    expect(uffd.pollFaults()).toBe(0) // nothing queued
    const read = inWorker<number>(region.describe(), `return u8[5 * ${ps} + 1]`)
    // Busy, as the agent is while it installs pushed frames: no turn of the loop
    // (the uv_poll cannot fire) until the fault has been seen here.
    let delivered = 0
    const deadline = Date.now() + 10_000
    while (delivered === 0 && Date.now() < deadline) delivered = uffd.pollFaults()
    expect(delivered).toBe(1)
    expect(faults).toEqual([5])
    expect(await read).toBe(42)
    ;(uffd as unknown as { stopFaults(): void }).stopFaults() // (native only: the agent never stops a reader it keeps)
    expect(uffd.pollFaults()).toBe(0) // no reader: nothing to deliver to
    uffd.close()
    region.release()
  })

  it('resolves faults from many threads at once, each page with its own bytes', async () => {
    const threads = 4, perThread = 40
    const { region, uffd } = missingRegion(b, threads * perThread)
    const faulted = new Set<number>()
    uffd.startFaults((ev) => {
      for (let i = 0; i < ev.length; i += 3) {
        const page = ev[i + 1]
        faulted.add(page)
        const existing = uffd.copy(region.id, page * ps, new Uint8Array(ps).fill((page % 251) + 1))
        expect(existing).toBeLessThanOrEqual(1)
      }
    })
    const results = await Promise.all(
      Array.from({ length: threads }, (_, t) =>
        inWorker<number[]>(region.describe(), `
          const out = []
          for (let p = ${t * perThread}; p < ${(t + 1) * perThread}; p++) out.push(u8[p * ${ps} + 100])
          return out`),
      ),
    )
    results.forEach((vals, t) => vals.forEach((v, i) => expect(v).toBe(((t * perThread + i) % 251) + 1)))
    expect(faulted.size).toBe(threads * perThread)
    uffd.close()
  })

  it('lets a worker own the uffd while the main thread faults (the agent topology)', async () => {
    const region = Region.create('t', 8 * ps)
    const src = `
      const { parentPort, workerData } = require('node:worker_threads')
      const { loadBinding } = require(${JSON.stringify(join(dist, 'binding.js'))})
      const b = loadBinding()
      const uffd = new b.Uffd(0)
      uffd.register(workerData.id, 0, workerData.size, b.constants.UFFDIO_REGISTER_MODE_MISSING)
      uffd.startFaults((ev) => {
        for (let i = 0; i < ev.length; i += 3) uffd.copy(ev[i], ev[i + 1] * b.pageSize, new Uint8Array(b.pageSize).fill(42))
      })
      parentPort.postMessage('ready')
      parentPort.on('message', () => { uffd.close(); process.exit(0) })`
    const w = new Worker(src, { eval: true, workerData: { id: region.id, size: region.sizeBytes } })
    await new Promise((r) => w.once('message', r))
    const u8 = new Uint8Array(region.buffer)
    expect(u8[5 * ps + 1]).toBe(42) // blocks in the fault until the worker copies
    w.postMessage('stop')
    await new Promise((r) => w.once('exit', r))
  })

  for (const kind of ['wp-async', 'sync-wp'] as const) describe(`tracker ${kind}`, () => {
  it('reports exactly the pages written since the last scan, then none', () => {
    const region = Region.create('t', 64 << 20)
    const tracker = openTracker(b, [region], kind)
    const u8 = new Uint8Array(region.buffer)
    let seed = 12345
    const rand = () => ((seed = (seed * 1103515245 + 12345) >>> 0) % region.pageCount)
    for (let trial = 0; trial < 5; trial++) {
      const written = new Set<number>()
      for (let i = 0; i < 500 * (trial + 1); i++) {
        const p = rand()
        written.add(p)
        u8[p * ps + (i % ps)] = trial + 1
      }
      expect(expandRuns(tracker.collectWritten(region.id, region.pageCount))).toEqual([...written].sort((a, b) => a - b))
      expect(tracker.collectWritten(region.id, region.pageCount)).toHaveLength(0)
    }
    tracker.close()
    region.release()
  })

  it('tracks pages that held memory before it began as well as never-touched ones', () => {
    const region = Region.create('t', 4096 * ps)
    const u8 = new Uint8Array(region.buffer)
    for (let p = 0; p < region.pageCount; p += 2) u8[p * ps] = 1 // every other page present before tracking
    const tracker = openTracker(b, [region], kind)
    const written = [1, 2, 3, 100, 101, 2048, 4094, 4095] // present and never-touched, side by side
    for (const p of written) u8[p * ps + 7] = 9
    expect(expandRuns(tracker.collectWritten(region.id, region.pageCount))).toEqual(written)
    expect(tracker.collectWritten(region.id, region.pageCount)).toHaveLength(0)
    tracker.close()
    region.release()
  })

  it('scans present pages of a sparse region as runs', () => {
    const region = Region.create('t', 8192 * ps)
    const tracker = openTracker(b, [region], kind)
    const u8 = new Uint8Array(region.buffer)
    for (const p of [0, 10, 11, 12, 5000]) u8[p * ps] = 1
    void u8[7000 * ps] // read-only touch: the zero page on most kernels
    const runs = Array.from(tracker.presentRuns(region.id, region.pageCount))
    // Linux 6.18 (this CI's kernel) fills a read fault on a write-protect
    // marker (WP_UNPOPULATED) with a fresh zeroed page instead of the zero
    // page: then it is present, and what matters is that round 0 finds it
    // all-zero and sends it as a range without payload.
    if (runs.length === 8) {
      expect(runs.slice(6)).toEqual([7000, 1])
      const zero = new Uint8Array(1)
      expect(b.zeroPages(region.id, 7000, 1, zero)).toBe(1)
    }
    expect(runs.slice(0, 6)).toEqual([0, 1, 10, 3, 5000, 1])
    expect(runs.length === 6 || runs.length === 8).toBe(true)
    tracker.close()
  })

  it('loses no write while a service thread writes during the rounds (copy after each collect = memory)', async () => {
    const region = Region.create('t', 16 << 20)
    const tracker = openTracker(b, [region], kind)
    const u8 = new Uint8Array(region.buffer)
    const shadow = new Uint8Array(region.sizeBytes)
    const copyRuns = (runs: Uint32Array) => {
      for (let k = 0; k < runs.length; k += 2) shadow.set(u8.subarray(runs[k] * ps, (runs[k] + runs[k + 1]) * ps), runs[k] * ps)
    }
    copyRuns(tracker.presentRuns(region.id, region.pageCount)) // round 0 (nothing yet)
    tracker.collectWritten(region.id, region.pageCount)
    const writing = inWorker<number>(region.describe(), `
      const ps = ${ps}, pages = u8.length / ps, end = Date.now() + 400
      let n = 0, seed = 7
      while (Date.now() < end) {
        seed = (seed * 1103515245 + 12345) >>> 0
        u8[(seed % pages) * ps + (n % ps)] = (n & 0xff) | 1
        n++
      }
      return n`)
    let rounds = 0
    const done = writing.then(() => true)
    while (!(await Promise.race([done, new Promise((r) => setTimeout(() => r(false), 5))]))) {
      copyRuns(tracker.collectWritten(region.id, region.pageCount))
      rounds++
    }
    const writes = await writing
    copyRuns(tracker.peekWritten(region.id, region.pageCount)) // the hand-off's final scan
    expect(writes).toBeGreaterThan(10_000)
    expect(rounds).toBeGreaterThan(5)
    expect(Buffer.compare(Buffer.from(shadow), Buffer.from(u8))).toBe(0)
    if (kind === 'sync-wp') expect(tracker.faults).toBeGreaterThan(1000)
    tracker.close()
    region.release()
  })
  })

  it('sync-wp: the fault thread moves to the CPU of the thread that wrote (followWriter), and stays put without it', () => {
    const pause = new Int32Array(new SharedArrayBuffer(4))
    for (const follow of [true, false]) {
      const region = Region.create('t', 64 * ps)
      const tracker = new b.SyncWpTracker!([region.id], follow)
      const u8 = new Uint8Array(region.buffer)
      for (let p = 0; p < 64; p++) u8[p * ps] = p + 1
      // the move comes after the writer was woken: give the thread a moment
      for (let i = 0; follow && i < 200 && tracker.stats.cpuMoves === 0; i++) Atomics.wait(pause, 0, 0, 10)
      if (!follow) Atomics.wait(pause, 0, 0, 20)
      expect(tracker.stats.wpFaults + tracker.stats.missingFaults).toBeGreaterThanOrEqual(64)
      // at least once onto the writer's CPU (again if the scheduler moved the writer meanwhile); never without it
      if (follow) expect(tracker.stats.cpuMoves).toBeGreaterThanOrEqual(1)
      else expect(tracker.stats.cpuMoves).toBe(0)
      const allowedBefore = cpusAllowed()
      expect(expandRuns(tracker.collect(region.id))).toEqual(Array.from({ length: 64 }, (_, p) => p))
      // the collect's re-protect ran off the writer's CPU (this thread's) where it may run elsewhere, and this
      // thread's CPU mask is what it was
      expect(tracker.stats.collectsMoved).toBe(follow && allowedBefore.length > 1 ? 1 : 0)
      expect(cpusAllowed()).toEqual(allowedBefore)
      expect(u8[63 * ps]).toBe(64)
      tracker.close()
      region.release()
    }
  })

  it('drops many runs at once: exactly those read as zero, the rest keep their bytes; a run outside is refused first', () => {
    const region = Region.create('t', 4096 * ps)
    const u8 = new Uint8Array(region.buffer)
    for (let p = 0; p < region.pageCount; p++) u8[p * ps + 7] = (p % 250) + 1
    const runs: number[] = []
    for (let p = 3; p < 4000; p += 5) runs.push(p, p % 3 === 0 ? 2 : 1) // 800 runs: more than one call's worth is fine too
    expect(() => b.discardRuns(region.id, Uint32Array.from([0, 1, 4095, 2]))).toThrow(/outside the region/)
    expect(u8[0 * ps + 7]).toBe(1) // nothing dropped by the refused call
    const calls = b.discardRuns(region.id, Uint32Array.from(runs))
    expect(calls).toBeGreaterThanOrEqual(1)
    const dropped = new Set<number>()
    for (let k = 0; k < runs.length; k += 2) for (let p = runs[k]; p < runs[k] + runs[k + 1]; p++) dropped.add(p)
    const wrong: number[] = []
    for (let p = 0; p < region.pageCount; p++) if (u8[p * ps + 7] !== (dropped.has(p) ? 0 : (p % 250) + 1)) wrong.push(p)
    expect(wrong).toEqual([])
    region.release()
  })

  it('places a zero page and detects all-zero pages', async () => {
    const { region, uffd } = missingRegion(b, 8)
    uffd.startFaults((ev) => {
      for (let i = 0; i < ev.length; i += 3) uffd.zeropage(region.id, ev[i + 1] * ps, ps)
    })
    expect(await inWorker<number>(region.describe(), `return u8[7 * ${ps} + 5] + u8[2 * ${ps}]`)).toBe(0)
    uffd.close()
    const plain = Region.create('z', 4 * ps)
    new Uint8Array(plain.buffer)[2 * ps + ps - 1] = 9
    const out = new Uint8Array(4)
    expect(b.zeroPages(plain.id, 0, 4, out)).toBe(3)
    expect(Array.from(out)).toEqual([1, 1, 0, 1])
  })

  it('makes a discarded page fault again', async () => {
    const { region, uffd } = missingRegion(b, 4)
    let faults = 0
    let fill = 1
    uffd.startFaults((ev) => {
      for (let i = 0; i < ev.length; i += 3) {
        faults++
        uffd.copy(region.id, ev[i + 1] * ps, new Uint8Array(ps).fill(fill))
      }
    })
    expect(await inWorker<number>(region.describe(), `return u8[2 * ${ps}]`)).toBe(1)
    region.discard(2 * ps, ps)
    fill = 2
    expect(await inWorker<number>(region.describe(), `return u8[2 * ${ps}]`)).toBe(2)
    expect(faults).toBe(2)
    uffd.close()
  })

  it('discardRegistered: zero pages through the uffd holding the region (no fault, old bytes gone); -1 once none holds it', async () => {
    const { region, uffd } = missingRegion(b, 8)
    let faults = 0
    uffd.startFaults(() => void faults++) // never answered: a fault here would hang the worker's read
    uffd.copy(region.id, 2 * ps, new Uint8Array(2 * ps).fill(7)) // pages 2 and 3 are here, the rest missing
    expect(region.discardRegistered(0, 6 * ps)).toBe(6)
    // (a read in a worker: this thread must not block in a fault it reads itself)
    expect(await inWorker<number>(region.describe(), `let s = 0; for (let p = 0; p < 6; p++) s += u8[p * ${ps} + 9]; return s`)).toBe(0)
    expect(faults).toBe(0)
    expect(uffd.zeropage(region.id, 0, 6 * ps)).toBe(6) // all placed: a late zero fill or push finds them there
    // close() lets go of the region, a held duplicate (a crashed agent's, kept for the next one) with it
    uffd.holdRegistrations!()
    uffd.close()
    expect(region.discardRegistered(6 * ps, ps)).toBe(-1)
    // a sync-wp source's registration (missing and write-protect) is never filled from outside its tracker
    const wp = new b.Uffd(b.constants.UFFD_FEATURE_PAGEFAULT_FLAG_WP)
    const other = Region.create('w', 4 * ps)
    wp.register(other.id, 0, other.sizeBytes, MISSING | b.constants.UFFDIO_REGISTER_MODE_WP)
    expect(other.discardRegistered(0, ps)).toBe(-1)
    wp.close()
    region.release()
    other.release()
  })

  it('returns EEXIST as a count of pages already present, and copies the rest', () => {
    const { region, uffd } = missingRegion(b, 8)
    expect(uffd.copy(region.id, 2 * ps, new Uint8Array(ps).fill(7))).toBe(0)
    expect(uffd.copy(region.id, 2 * ps, new Uint8Array(ps).fill(8))).toBe(1)
    // pages 0..3: page 2 exists, the other three are copied
    expect(uffd.copy(region.id, 0, new Uint8Array(4 * ps).fill(9))).toBe(1)
    expect(uffd.zeropage(region.id, 0, 8 * ps)).toBe(4)
    uffd.close()
    const u8 = new Uint8Array(region.buffer)
    expect([u8[0], u8[ps], u8[2 * ps], u8[3 * ps], u8[4 * ps]]).toEqual([9, 9, 7, 9, 0])
  })

  it('a scan split over threads returns the runs of one walk, a run across the split joined again', () => {
    const pages = 1 << 18 // 1 GiB of 4 KiB pages: two parts of 512 MiB
    const region = Region.create('t', pages * ps)
    const u8 = new Uint8Array(region.buffer)
    const mid = pages / 2
    for (const p of [0, 5, mid - 2, mid - 1, mid, mid + 1, pages - 1]) u8[p * ps] = 1
    const P = b.constants.PAGE_IS_PRESENT
    const one = Array.from(b.pagemapScan(region.id, 0, pages, 0, P, 0, 0, P))
    expect(one).toEqual([0, 1, 5, 1, mid - 2, 4, pages - 1, 1])
    for (const threads of [2, 4]) expect(Array.from(b.pagemapScan(region.id, 0, pages, 0, P, 0, 0, P, threads))).toEqual(one)
    // a range that starts inside the region: runs stay relative to the region
    expect(Array.from(b.pagemapScan(region.id, 3, pages - 3, 0, P, 0, 0, P, 2))).toEqual([5, 1, mid - 2, 4, pages - 1, 1])
    expect(() => b.pagemapScan(region.id, 0, pages, 0, P, 0, 0, P, 65)).toThrow(/threads/)
    region.release()
  })

  it('rejects out-of-range and malformed arguments before any syscall', () => {
    const { region, uffd } = missingRegion(b, 4)
    const page = new Uint8Array(ps)
    expect(() => uffd.copy(region.id, 4 * ps, page)).toThrow(/page-aligned offset below 16384, got 16384/)
    expect(() => uffd.copy(region.id, 1, page)).toThrow(RangeError)
    expect(() => uffd.copy(region.id, 3 * ps, new Uint8Array(2 * ps))).toThrow(/at most 4096 bytes/)
    expect(() => uffd.copy(region.id, 0, new Uint8Array(100))).toThrow(RangeError)
    expect(() => uffd.zeropage(region.id, -ps, ps)).toThrow(RangeError)
    expect(() => uffd.zeropage(region.id, Number.NaN, ps)).toThrow(RangeError)
    expect(() => uffd.wake(region.id, 0, 0)).toThrow(RangeError)
    expect(() => b.discard(region.id, 0, 5 * ps)).toThrow(RangeError)
    expect(() => b.pagemapScan(region.id, 3, 2, 0, 8, 0, 0, 8)).toThrow(RangeError)
    expect(() => b.zeroPages(region.id, 0, 4, new Uint8Array(3))).toThrow(RangeError)
    expect(() => uffd.copy(999999, 0, page)).toThrow(expect.objectContaining({ code: 'ERR_REGION_RELEASED' }))
    // a flag that is not a boolean is a mistake, never a choice ('false' and 1 would both have read as true)
    expect(() => uffd.copy(region.id, 0, page, 'false' as never)).toThrow(/expected wake: boolean/)
    expect(() => uffd.writeProtect(region.id, 0, ps, 1 as never)).toThrow(/expected protect: boolean/)
    expect(() => Region.create('x', 0)).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG' }))
    expect(() => Region.create('x', 2 ** 32 + ps)).toThrow(/at most 4294967296 bytes/)
    uffd.close()
    expect(() => uffd.copy(region.id, 0, page)).toThrow(expect.objectContaining({ code: 'ERR_UFFD_CLOSED' }))
  })

  it('turns a failing ioctl into an error with code, errno, syscall and a hint', () => {
    let err: any
    try {
      new b.Uffd(2 ** 31)
    } catch (e) {
      err = e
    }
    expect(err.name).toBe('UffdMigrateError')
    expect(err).toMatchObject({ code: 'EINVAL', errno: 22, syscall: 'ioctl(UFFDIO_API)' })
    expect(err.message).toMatch(/uffd-migrate doctor/)
    const region = Region.create('t', ps)
    const a = new b.Uffd(0)
    const c = new b.Uffd(0)
    a.register(region.id, 0, ps, MISSING)
    expect(() => c.register(region.id, 0, ps, MISSING)).toThrow(expect.objectContaining({ code: 'EBUSY', syscall: 'ioctl(UFFDIO_REGISTER)' }))
    a.close()
    c.close()
  })

  it('keeps memory valid for a worker that holds a view after release in the main thread', async () => {
    const region = Region.create('t', 4 * ps)
    new Uint8Array(region.buffer)[ps] = 77
    const desc = region.describe()
    const src = `
      const { parentPort, workerData } = require('node:worker_threads')
      const { Region } = require(${JSON.stringify(join(dist, 'region.js'))})
      const u8 = new Uint8Array(Region.open(workerData).buffer)
      parentPort.postMessage('open')
      parentPort.once('message', () => { u8[2 * 4096] = 5; parentPort.postMessage(u8[4096] + u8[2 * 4096]) })`
    const w = new Worker(src, { eval: true, workerData: desc })
    await new Promise((r) => w.once('message', r))
    const buf = region.buffer
    region.release()
    expect(buf.byteLength).toBe(0) // detached here
    expect(() => region.buffer).toThrow(expect.objectContaining({ code: 'ERR_REGION_RELEASED' }))
    expect(() => Region.open(desc)).toThrow(expect.objectContaining({ code: 'ERR_REGION_RELEASED' }))
    w.postMessage('go')
    expect(await new Promise((r) => w.once('message', r))).toBe(82)
    await w.terminate()
  })
})

/** The CPUs this thread may run on (/proc/thread-self/status), e.g. [0, 1]. */
function cpusAllowed(): number[] {
  const list = /^Cpus_allowed_list:\s*(.+)$/m.exec(readFileSync('/proc/thread-self/status', 'utf8'))?.[1] ?? ''
  return list.split(',').flatMap((part) => {
    const [lo, hi = lo] = part.split('-').map(Number)
    return Array.from({ length: hi - lo + 1 }, (_, k) => lo + k)
  })
}

function expandRuns(runs: Uint32Array): number[] {
  const out: number[] = []
  for (let i = 0; i < runs.length; i += 2) for (let p = runs[i]; p < runs[i] + runs[i + 1]; p++) out.push(p)
  return out
}
