/**
 * What the destination holds and what is still to send: the one owner of
 * destHas, everSent, pending and the page counts. Every page leaves through
 * here, as PAGES frames that are views of the region's memory (no copy) or,
 * when all-zero or free, as RANGES without payload. After the hand-off only
 * pending pages go, and each leaves the pending map as it is sent: that is
 * "each page at most once after the hand-off", whichever channel carries it.
 * The native demand thread takes pages from the same pending map; a page
 * belongs to whoever clears its bit first (PageBitmap.takeRange, atomic).
 */
import type { NativeBinding, NativeDemandServer } from '../../binding'
import { PageBitmap } from '../../bitmap'
import type { Channel } from '../../protocol/channel'
import { encodeControl, encodeRuns, MAX_PAGES_PER_FRAME, Msg, pagesHeader, RangeKind } from '../../protocol/messages'
import type { Region } from '../../region'
import { DemandEv, eachDemandEvent, nativeLinkError } from '../demand-events'
import { NativeThread } from '../native-thread'
import { nativeSealAvailable, type Taken } from '../native-seal'
import { NativeBulkSend, nativeWriterAvailable } from './bulk-writer'
import { splitByLane } from './lanes'
import { reply } from './link'
import { eachPair, type Runs, writeRunBatches } from './writer-batches'

/**
 * After the hand-off, frames carry at most 256 KiB: while a fault is open the
 * destination reads one bulk frame per turn of its loop, so the frame size is
 * what a fault's reply may wait behind (1 MiB frames doubled the fault p50).
 */
export const POSTCOPY_FRAME_PAGES = 64

/** Run entries per RANGES frame: 32 KiB. */
const RANGE_ENTRIES_PER_FRAME = 8192

export interface SendCounts {
  data: number
  zero: number
  free: number
  resent: number
}

export class Sender {
  /** The destination holds the current version of these pages (data or zero). */
  readonly destHas: PageBitmap[]
  /** Sent with payload at least once (to count resends). */
  private readonly everSent: PageBitmap[]
  /** After the hand-off: pages still to send, each exactly once. */
  pending: PageBitmap[] = []
  /** After the hand-off: pages still pending. */
  pagesLeft = 0
  readonly counts: SendCounts = { data: 0, zero: 0, free: 0, resent: 0 }
  private readonly zeroScratch = new Uint8Array(MAX_PAGES_PER_FRAME)
  readonly pageSize: number
  private demandServer: NativeThread<NativeDemandServer> | undefined
  /** The bulk connection's native writer (writeNatively()). */
  private writer: NativeBulkSend | undefined
  /** CPU time of the native threads that have ended (the report's source CPU). */
  private endedCpuMs = 0
  /** Parallel bulk streams before the hand-off (lanes.ts): lane 0 is bulk; empty: bulk alone. */
  private lanes: Channel[] = []
  private laneWriters: NativeBulkSend[] = []
  /** The destination reads BATCH frames (REGIONS_OK): native writers announce their gathered writes. */
  private announce = false

  constructor(
    private readonly binding: NativeBinding,
    private readonly regions: Region[],
  ) {
    this.pageSize = binding.pageSize
    this.destHas = regions.map((r) => new PageBitmap(r.pageCount))
    this.everSent = regions.map((r) => new PageBitmap(r.pageCount))
  }

  /** Pages the destination does not hold yet (before the hand-off). */
  get notAtDestination(): number {
    return this.regions.reduce((n, r, i) => n + r.pageCount - this.destHas[i].count(), 0)
  }

  /** CPU time of the native threads (demand server, bulk writers), ended and running. */
  get nativeCpuMs(): number {
    return this.endedCpuMs + [this.writer, ...this.laneWriters, ...this.retiredWriters].reduce((n, w) => n + (w?.cpuMs ?? 0), 0)
  }

  /**
   * Pre-copy over parallel streams: each extra stream gets a native writer
   * and pages travel on their lane (lanes.ts). False (nothing changed) when
   * bulk or an extra stream cannot be written natively.
   */
  useLanes(bulk: Channel, extra: Channel[]): boolean {
    if (!this.queuesNatively(bulk) || !extra.length) return false
    const writers: NativeBulkSend[] = []
    for (const ch of extra) {
      const w = this.attachWriter(ch)
      if (!w) return false
      writers.push(w)
    }
    this.lanes = [bulk, ...extra]
    this.laneWriters = writers
    return true
  }

  /**
   * Every extra stream has applied what was sent on it (a SYNC answered on
   * each): the barrier before a frame that changes the rules for every page.
   * Then, with lanes false, pages travel on bulk alone from now on (the hand-off).
   */
  async barrier(keepLanes: boolean): Promise<void> {
    // nothing went on them since the last barrier (pre-copy's end has one): no round trip, none in the pause window
    const extra = this.sentOnLanes ? this.lanes.slice(1) : []
    this.sentOnLanes = false // (what goes on them while the SYNCs are out is not covered by them)
    await Promise.all(extra.map(async (ch) => {
      const answered = reply(ch, Msg.SYNC)
      ch.send(encodeControl(Msg.SYNC, {}))
      await answered
    }))
    if (keepLanes) return
    this.lanes = []
    for (const w of this.laneWriters) this.extraBytes += w.bytesWritten
    // their threads end when the destination closes the streams: their CPU arrives then (onCpu), until then it is live
    this.retiredWriters.push(...this.laneWriters)
    this.laneWriters = []
  }

  /** Something went on the extra streams since the last barrier. */
  private sentOnLanes = false

  /** What is sent on ch goes on the lanes (ch is bulk, with extra streams): noted for the next barrier. */
  private onLanes(ch: Channel): boolean {
    const on = this.lanes.length > 1 && ch === this.lanes[0]
    if (on) this.sentOnLanes = true
    return on
  }

  /** Extra streams' writers after the hand-off, until their connections close (cpuMs: 0 once closed). */
  private retiredWriters: NativeBulkSend[] = []

  /** Bulk streams pages travel on now (1: bulk alone). */
  get streams(): number {
    return Math.max(1, this.lanes.length)
  }

  /** Bytes the extra streams wrote, ended and running (round and hand-off byte counts add them to bulk's). */
  get laneBytes(): number {
    return this.extraBytes + this.laneWriters.reduce((n, w) => n + w.bytesWritten, 0)
  }

  private extraBytes = 0

  /** Waits until ch (and, for bulk, every extra stream) has written what was queued. */
  async drain(ch: Channel): Promise<void> {
    await Promise.all(ch === this.lanes[0] ? this.lanes.map((l) => l.drain()) : [ch.drain()])
  }

  /** The channels (with their runs) that carry these runs: their lanes when ch is bulk with extra streams. */
  private route(ch: Channel, runs: Uint32Array): [Channel, Uint32Array][] {
    if (!this.onLanes(ch)) return [[ch, runs]]
    const split = splitByLane(runs, this.lanes.length)
    return this.lanes.map((lane, i): [Channel, Uint32Array] => [lane, Uint32Array.from(split[i])]).filter(([, r]) => r.length > 0)
  }

  /** From the hand-off (or a recovery) on: what is still to send. */
  /** count: their pages, when the caller knows it (the hand-off: not a count over all memory in the pause window). */
  setPending(pending: PageBitmap[], count = pending.reduce((n, m) => n + m.count(), 0)): void {
    this.pending = pending
    this.pagesLeft = count
    this.writer?.setPending(pending.map((m) => m.words))
  }

  /**
   * A native thread writes this (bulk) connection from now on, when the addon
   * has one (bulk-writer.ts); false: the JS path goes on.
   */
  writeNatively(ch: Channel): boolean {
    const writer = this.attachWriter(ch)
    if (!writer) return false
    this.writer = writer
    if (this.pending.length) writer.setPending(this.pending.map((m) => m.words))
    return true
  }

  /**
   * ch is written by this sender's native writer: sendRuns() hands its pages to
   * the writer's queue, and with yieldToLoop false all of them are queued
   * (in order, ahead of any later frame on ch) before it returns.
   */
  queuesNatively(ch: Channel): boolean {
    return this.writer !== undefined && ch.frameWriter === this.writer
  }

  /** REGIONS_OK said the destination reads BATCH: every native writer, and those attached later, announce. */
  announceBatches(): void {
    this.announce = true
    for (const w of [this.writer, ...this.laneWriters]) w?.announceBatches()
  }

  private attachWriter(ch: Channel): NativeBulkSend | undefined {
    if (!nativeWriterAvailable(this.binding) || (ch.sealed && !nativeSealAvailable(this.binding))) return undefined
    const onCpu = (ms: number) => (this.endedCpuMs += ms)
    // (sealed: the thread seals what it writes itself, native/records.h)
    const writer = ch.useWriter((fd, seal) => new NativeBulkSend(this.binding, fd, this.regions.map((r) => r.id), this.destHas.map((m) => m.words), this.everSent.map((m) => m.words), {
      onDone: (data, zero, resent) => void ((this.counts.data += data), (this.counts.zero += zero), (this.counts.resent += resent)),
      onSent: (_region, _first, count) => (this.pagesLeft -= count),
      onClosed: (errno) => ch.fail(nativeLinkError(errno, 0, ch.name)),
      onCpu,
    }, seal))
    if (!(writer instanceof NativeBulkSend)) return undefined
    if (this.announce) writer.announceBatches()
    return writer
  }

  /**
   * Sends runs of one region ([first, count] pairs), in order: through the
   * native writer in batches (a few in flight) when ch has it, else run by
   * run in JS, letting the agent's loop in every 64 runs (a cancel waits for
   * no more than that) unless yieldToLoop is false (the pause window; through
   * the native writer all is then queued before this returns: the promise counts).
   */
  async sendRuns(ch: Channel, region: number, runs: Runs, afterHandoff: boolean, yieldToLoop = true): Promise<{ data: number; zero: number }> {
    if (this.queuesNatively(ch)) {
      // one writer per lane (bulk alone: one)
      const writers = (this.onLanes(ch) ? this.lanes : [ch]).map((lane) => lane.frameWriter as NativeBulkSend)
      const framePages = afterHandoff ? POSTCOPY_FRAME_PAGES : MAX_PAGES_PER_FRAME
      return writeRunBatches(writers, region, runs, { framePages, takePending: afterHandoff, yieldToLoop, failed: () => ch.failed !== undefined })
    }
    const total = { data: 0, zero: 0 }
    let runsSent = 0
    for (const [s, n] of runs instanceof Uint32Array ? eachPair(runs) : runs) {
      if (yieldToLoop && ++runsSent % 64 === 0) await new Promise((r) => setImmediate(r))
      const sent = await this.sendRun(ch, region, s, n, afterHandoff)
      total.data += sent.data
      total.zero += sent.zero
    }
    return total
  }

  /**
   * After the hand-off, with a demand connection (taken: takeDuplex()): a native thread answers its page requests from
   * region memory and the pending map. onFault: the first page of each requested run (the push policy's pivots);
   * onSent: pages it sent.
   */
  serveDemand(taken: Taken, hooks: { onFault(region: number, page: number): void; onSent(pages: number): void; onClosed(errno: number, protocol: number): void }): void {
    this.stopDemand()
    const { fd, head, seal } = taken
    const onEvents = (ev: Float64Array) => eachDemandEvent(ev, (kind, a, b, c) => {
      if (kind === DemandEv.FAULT) hooks.onFault(a, b)
      else if (kind === DemandEv.SENT) {
        this.pagesLeft -= c
        this.counts.data += c
        this.destHas[a].setRange(b, c)
        hooks.onSent(c)
      } else if (kind === DemandEv.CLOSED) hooks.onClosed(a, b)
      else if (kind === DemandEv.CPU) this.endedCpuMs += a
    })
    this.demandServer = new NativeThread(new this.binding.DemandServer!(fd, this.regions.map((r) => r.id), this.pending.map((m) => m.words), onEvents, head, seal), onEvents)
  }

  /** Stops the demand thread; what it did since its last batch is counted now. */
  stopDemand(): void {
    const server = this.demandServer
    this.demandServer = undefined
    server?.close()
  }

  /** The destination freed these runs after the hand-off: never send them. */
  dropPending(region: number, runs: Uint32Array): void {
    for (let k = 0; k < runs.length; k += 2) {
      const n = this.pending[region]?.clearRange(runs[k], runs[k + 1]) ?? 0
      this.pagesLeft -= n
      this.counts.free += n
    }
  }

  /** Pages of [0, pageCount) outside `present` runs go as zero ranges. */
  sendComplementAsZero(ch: Channel, region: number, present: Uint32Array): number {
    const pages = this.regions[region].pageCount
    const runs = new Uint32Array(present.length + 2) // at most one gap before each run, and one after the last
    let n = 0, cursor = 0
    for (let k = 0; k <= present.length; k += 2) {
      const s = k < present.length ? present[k] : pages
      if (s > cursor) (runs[n++] = cursor), (runs[n++] = s - cursor)
      if (k < present.length) cursor = present[k] + present[k + 1]
    }
    return this.sendRanges(ch, RangeKind.ZERO, region, runs.subarray(0, n))
  }

  /**
   * Pre-copy: the destination's copy of these pages is out of date and they
   * will not be sent again this round (hot): it drops them now, while the
   * service still runs here, instead of in the pause window at the hand-off.
   * Only pages it holds are named. Returns how many.
   */
  sendStale(ch: Channel, region: number, candidates: PageBitmap): number {
    const has = this.destHas[region]
    const runs: number[] = []
    for (const [s, n] of candidates.runs()) {
      has.eachRun(s, s + n, (p, q, held) => {
        if (held) runs.push(p, q - p)
      })
    }
    this.sendRunsFrames(ch, RangeKind.STALE, region, runs)
    let pages = 0
    for (let k = 0; k < runs.length; k += 2) pages += has.clearRange(runs[k], runs[k + 1])
    return pages
  }

  /** Sends runs without payload, marking them current at the destination. */
  sendRanges(ch: Channel, kind: RangeKind, region: number, runs: ArrayLike<number>): number {
    let pages = 0
    this.sendRunsFrames(ch, kind, region, runs)
    for (let k = 0; k < runs.length; k += 2) {
      this.destHas[region].setRange(runs[k], runs[k + 1])
      if (this.pending.length) this.pagesLeft -= this.pending[region].clearRange(runs[k], runs[k + 1])
      pages += runs[k + 1]
    }
    if (kind === RangeKind.FREE) this.counts.free += pages
    else this.counts.zero += pages
    return pages
  }

  /** RANGES frames of one kind, each on the lane of its pages (see route()). */
  private sendRunsFrames(ch: Channel, kind: RangeKind, region: number, runs: ArrayLike<number>): void {
    for (const [lane, list] of this.route(ch, runs instanceof Uint32Array ? runs : Uint32Array.from(runs))) {
      for (let k = 0; k < list.length; k += RANGE_ENTRIES_PER_FRAME) lane.send(encodeRuns(Msg.RANGES, kind, region, list.subarray(k, k + RANGE_ENTRIES_PER_FRAME)))
    }
  }

  /** Free-page reports from the service ([region, first, count] triples): sent as FREE ranges. */
  sendFreed(ch: Channel, triples: number[]): number {
    let pages = 0
    const byRegion = new Map<number, number[]>()
    for (let k = 0; k < triples.length; k += 3) {
      const list = byRegion.get(triples[k]) ?? []
      list.push(triples[k + 1], triples[k + 2])
      byRegion.set(triples[k], list)
    }
    for (const [region, runs] of byRegion) pages += this.sendRanges(ch, RangeKind.FREE, region, runs)
    return pages
  }

  /**
   * Sends one run of pages, all-zero pages as ranges. After the hand-off only
   * pages still pending go: a page requested on the urgent channel while this
   * run waited for the bulk channel to drain is not sent twice.
   */
  async sendRun(ch: Channel, region: number, first: number, count: number, afterHandoff: boolean): Promise<{ data: number; zero: number }> {
    const total = { data: 0, zero: 0 }
    const end = first + count
    const framePages = afterHandoff ? POSTCOPY_FRAME_PAGES : MAX_PAGES_PER_FRAME
    for (let base = first; base < end; base += framePages) {
      // a broken link: stop here (what was pending is learnt again on recovery, never
      // cleared by sending into a dead connection after a new pending map replaced it)
      if (ch.failed) break
      const chunkEnd = Math.min(end, base + framePages)
      if (!afterHandoff) {
        this.sendChunk(ch, region, base, chunkEnd - base, total)
      } else {
        // the pending pages of the chunk become ours before they go (the demand thread may want them too)
        const runs: number[] = []
        this.pagesLeft -= this.pending[region].takeRange(base, chunkEnd - base, (p, q) => runs.push(p, q))
        for (let k = 0; k < runs.length; k += 2) this.sendChunk(ch, region, runs[k], runs[k + 1] - runs[k], total)
      }
      if (ch.needsDrain) await ch.drain()
    }
    return total
  }

  /** Sends at most MAX_PAGES_PER_FRAME pages, synchronously. */
  private sendChunk(ch: Channel, region: number, base: number, n: number, total: { data: number; zero: number }): void {
    const r = this.regions[region]
    const zeroRuns: number[] = []
    this.splitZero(r.id, base, n, (p, count, isZero) => {
      if (isZero) {
        zeroRuns.push(p, count)
        total.zero += count
        return
      }
      ch.send([pagesHeader(region, p, count, this.pageSize), Buffer.from(r.buffer, p * this.pageSize, count * this.pageSize)])
      total.data += count
      this.counts.data += count
      this.counts.resent += count - this.everSent[region].setRange(p, count) // pages sent before
      this.destHas[region].setRange(p, count)
    })
    if (zeroRuns.length) this.sendRanges(ch, RangeKind.ZERO, region, zeroRuns)
  }

  /** Splits [base, base+n) (n <= MAX_PAGES_PER_FRAME) into runs of all-zero and non-zero pages. */
  splitZero(regionId: number, base: number, n: number, onRun: (first: number, count: number, isZero: boolean) => void): void {
    this.binding.zeroPages(regionId, base, n, this.zeroScratch)
    for (let i = 0; i < n; ) {
      const isZero = this.zeroScratch[i]
      let j = i + 1
      while (j < n && this.zeroScratch[j] === isZero) j++
      onRun(base + i, j - i, isZero === 1)
      i = j
    }
  }
}
