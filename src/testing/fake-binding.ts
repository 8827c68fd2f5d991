/**
 * A fake of the native addon behind the same NativeBinding interface, for the
 * pure test tier: one instance is one host. Regions are plain ArrayBuffers
 * with a per-page model the kernel would keep: present (a page-table entry)
 * and written (since the last write-protecting scan). Writes go through
 * write() (the fake cannot see stores into an ArrayBuffer); reads of a
 * missing page of a MISSING-registered region go through touch(), which
 * queues a fault like the kernel and resolves when the page is installed.
 * UFFDIO_COPY / ZEROPAGE count pages already present (EEXIST) per page.
 */
import type { NativeBinding, NativeUffd, ProbeResult, SocketBuffers } from '../binding'
import { ErrorCode, UffdMigrateError } from '../errors'

const K = {
  UFFD_FEATURE_WP_UNPOPULATED: 8192, UFFD_FEATURE_WP_ASYNC: 32768,
  UFFDIO_REGISTER_MODE_MISSING: 1, UFFDIO_REGISTER_MODE_WP: 2,
  PM_SCAN_WP_MATCHING: 1, PM_SCAN_CHECK_WPASYNC: 2,
  PAGE_IS_WRITTEN: 2, PAGE_IS_PRESENT: 8, PAGE_IS_PFNZERO: 32,
} as const

interface FakeRegion {
  buffer: ArrayBuffer
  pages: number
  present: Uint8Array
  written: Uint8Array
  /** The uffd that registered it MISSING, if any. */
  missing: FakeUffd | undefined
  /** Faulting readers waiting for a page: page -> resolvers. */
  waiters: Map<number, (() => void)[]>
}

export class FakeBinding implements NativeBinding {
  readonly pageSize: number
  readonly constants: Record<string, number> = { ...K }
  private readonly regions = new Map<number, FakeRegion>()
  private nextId = 1
  readonly Uffd: new (features: number) => NativeUffd

  constructor(pageSize = 4096) {
    this.pageSize = pageSize
    const host = this
    this.Uffd = class extends FakeUffd {
      constructor(features: number) {
        super(host, features)
      }
    }
  }

  init(): void {}

  region(id: number): FakeRegion {
    const r = this.regions.get(id)
    if (!r) throw new UffdMigrateError(`fake: no region ${id}`, ErrorCode.INVALID_ARG)
    return r
  }

  regionCreate(bytes: number): { id: number; buffer: ArrayBuffer } {
    const id = this.nextId++
    const pages = bytes / this.pageSize
    const buffer = new ArrayBuffer(bytes)
    this.regions.set(id, { buffer, pages, present: new Uint8Array(pages), written: new Uint8Array(pages), missing: undefined, waiters: new Map() })
    return { id, buffer }
  }

  regionOpen(id: number): ArrayBuffer {
    return this.region(id).buffer
  }

  regionRelease(): boolean {
    return false
  }

  discard(regionId: number, offset: number, length: number): void {
    const r = this.region(regionId)
    new Uint8Array(r.buffer, offset, length).fill(0)
    r.present.fill(0, offset / this.pageSize, (offset + length) / this.pageSize)
    r.written.fill(0, offset / this.pageSize, (offset + length) / this.pageSize)
  }

  discardRuns(regionId: number, runs: Uint32Array): number {
    for (let k = 0; k < runs.length; k += 2) this.discard(regionId, runs[k] * this.pageSize, runs[k + 1] * this.pageSize)
    return runs.length ? 1 : 0
  }

  /** The service writes: the page becomes present and written. */
  write(regionId: number, offset: number, bytes: Uint8Array): void {
    const r = this.region(regionId)
    const first = Math.floor(offset / this.pageSize), end = Math.ceil((offset + bytes.length) / this.pageSize)
    for (let p = first; p < end; p++) {
      if (r.missing && !r.present[p]) throw new Error(`fake: write to missing page ${p} of region ${regionId}: touch() it first`)
    }
    new Uint8Array(r.buffer, offset, bytes.length).set(bytes)
    r.present.fill(1, first, end)
    r.written.fill(1, first, end)
  }

  isPresent(regionId: number, page: number): boolean {
    return this.region(regionId).present[page] === 1
  }

  /** The service reads a page: resolves at once if present, else faults (MISSING) and waits for the install. */
  touch(regionId: number, page: number): Promise<void> {
    const r = this.region(regionId)
    if (r.present[page] || !r.missing) return Promise.resolve()
    return new Promise((resolve) => {
      const list = r.waiters.get(page) ?? []
      list.push(resolve)
      r.waiters.set(page, list)
      r.missing!.raise(regionId, page)
    })
  }

  /** Installs pages (copy or zero); returns how many were present already. */
  install(regionId: number, offset: number, length: number, src: Uint8Array | undefined): number {
    const r = this.region(regionId)
    const ps = this.pageSize
    let existing = 0
    for (let p = offset / ps; p < (offset + length) / ps; p++) {
      if (r.present[p]) {
        existing++
        continue
      }
      const dst = new Uint8Array(r.buffer, p * ps, ps)
      if (src) dst.set(src.subarray(p * ps - offset, p * ps - offset + ps))
      else dst.fill(0)
      r.present[p] = 1
      this.wakePage(r, p)
    }
    return existing
  }

  wakePage(r: FakeRegion, page: number): void {
    const list = r.waiters.get(page)
    if (!list) return
    r.waiters.delete(page)
    for (const w of list) w()
  }

  pagemapScan(regionId: number, firstPage: number, pageCount: number, flags: number, mask: number, inverted: number, anyof: number, _ret: number): Uint32Array {
    const r = this.region(regionId)
    const runs: number[] = []
    for (let p = firstPage; p < firstPage + pageCount; p++) {
      const cat = (r.present[p] ? K.PAGE_IS_PRESENT : 0) | (r.written[p] ? K.PAGE_IS_WRITTEN : 0)
      const x = cat ^ inverted
      const match = (x & mask) === mask && (anyof === 0 || (x & anyof) !== 0)
      if (!match) continue
      if (flags & K.PM_SCAN_WP_MATCHING) r.written[p] = 0
      const n = runs.length
      if (n && runs[n - 2] + runs[n - 1] === p) runs[n - 1]++
      else runs.push(p, 1)
    }
    return Uint32Array.from(runs)
  }

  pagemapProtectAll(): void {}

  zeroPages(regionId: number, firstPage: number, pageCount: number, out: Uint8Array): number {
    const r = this.region(regionId)
    const ps = this.pageSize
    let zero = 0
    for (let i = 0; i < pageCount; i++) {
      const page = new Uint8Array(r.buffer, (firstPage + i) * ps, ps)
      let isZero = 1
      for (let b = 0; b < ps; b += 8) if (page[b] | page[b + 1] | page[b + 2] | page[b + 3] | page[b + 4] | page[b + 5] | page[b + 6] | page[b + 7]) { isZero = 0; break }
      out[i] = isZero
      zero += isZero
    }
    return zero
  }

  setSocketBuffers(_fd: number, sendBytes: number, receiveBytes: number): SocketBuffers {
    return { sendBytes, receiveBytes }
  }

  setSocketUnsentLimit(): void {}
  setSocketLiveness(): void {}
  setSocketPacing(_fd: number, bytesPerSec: number): number {
    return bytesPerSec
  }
  setThreadNice(): void {}

  probe(): ProbeResult {
    return { features: K.UFFD_FEATURE_WP_ASYNC | K.UFFD_FEATURE_WP_UNPOPULATED, ioctls: 0, viaSyscall: 0, viaDevice: 0, pagemapScan: 0 }
  }
}

class FakeUffd implements NativeUffd {
  readonly ioctls = 0
  readonly fd = -1
  private closed = false
  private callback: ((events: Uint32Array) => void) | undefined
  private queued: number[] = []
  private scheduled = false
  private readonly registered = new Set<number>()

  constructor(
    private readonly host: FakeBinding,
    readonly features: number,
  ) {}

  private check(): void {
    if (this.closed) throw new UffdMigrateError('this userfaultfd is closed', ErrorCode.UFFD_CLOSED)
  }

  register(regionId: number, _offset: number, _length: number, mode: number): number {
    this.check()
    if (mode & K.UFFDIO_REGISTER_MODE_MISSING) this.host.region(regionId).missing = this
    this.registered.add(regionId)
    return 0
  }

  unregister(regionId: number): void {
    this.check()
    const r = this.host.region(regionId)
    if (r.missing === this) {
      r.missing = undefined
      // plain anonymous memory again: a waiting reader gets a zero-filled page
      for (const page of [...r.waiters.keys()]) {
        r.present[page] = 1
        this.host.wakePage(r, page)
      }
    }
    this.registered.delete(regionId)
  }

  copy(regionId: number, offset: number, src: Uint8Array): number {
    this.check()
    return this.host.install(regionId, offset, src.length, src)
  }

  zeropage(regionId: number, offset: number, length: number): number {
    this.check()
    return this.host.install(regionId, offset, length, undefined)
  }

  wake(): void {
    this.check()
  }

  writeProtect(): void {
    this.check()
  }

  raise(regionId: number, page: number): void {
    this.queued.push(regionId, page, 0)
    if (this.scheduled) return
    this.scheduled = true
    setImmediate(() => {
      this.scheduled = false
      this.pollFaults()
    })
  }

  startFaults(callback: (events: Uint32Array) => void): void {
    this.check()
    this.callback = callback
  }

  pollFaults(): number {
    if (!this.callback || this.closed || this.queued.length === 0) return 0
    const ev = Uint32Array.from(this.queued)
    this.queued = []
    this.callback(ev)
    return ev.length / 3
  }

  close(): void {
    this.closed = true
    for (const id of this.registered) {
      const r = this.host.region(id)
      if (r.missing === this) r.missing = undefined
    }
  }
}
