/**
 * The source side of one migration, in the agent's worker: connect and
 * authenticate both channels, pre-copy rounds driven by the dirty tracker,
 * hand-off, then post-copy (answer page requests first, push the rest) until
 * the destination says settled. The service's memory is kept until then.
 */
import { randomBytes } from 'node:crypto'
import { connect, type Socket } from 'node:net'
import type { NativeBinding } from '../binding'
import { PageBitmap } from '../bitmap'
import { ErrorCode, migrationError, UffdMigrateError } from '../errors'
import { Channel } from '../protocol/channel'
import type { Frame } from '../protocol/frames'
import { clientHandshake, peerError } from '../protocol/handshake'
import {
  BULK_SOCKET_BUFFER_BYTES, decodeControl, decodeRuns, encodeControl, encodeRuns, field, MAX_PAGES_PER_FRAME, Msg, pagesHeader, RangeKind,
  type RegionLayout,
} from '../protocol/messages'
import type { Region } from '../region'
import { nowMs } from '../stats'
import type { PushPolicy } from './push-policy'
import { createPushPolicy, type PrepagingOptions } from './prepaging'
import type { MigrationMode, MigrationReport, RoundReport } from './report'
import { DirtyTracker } from './tracker'
import { parseAddress } from './address'

export interface SourceOptions {
  to: string
  mode: MigrationMode
  token: Buffer
  /** Downtime budget for convergence (precopy: the stop-and-copy must fit in it). */
  downtimeMs: number
  maxRounds: number
  connectTimeoutMs: number
  /** Post-copy: how long to keep dialling the destination again after the link broke (0: fail at once). */
  recoveryTimeoutMs: number
  /** A connection whose peer stops answering fails after this long (keepalive + TCP_USER_TIMEOUT; 0: never). */
  linkTimeoutMs: number
  prepaging: PrepagingOptions
  /** Record the push order in the report (tests, benchmarks). */
  pushLog: boolean
}

export interface SourceHooks {
  /** Ask the service to stop mutating; resolves with its msgpackr-encoded state. */
  pause(): Promise<Uint8Array>
  /** Migration failed after pause(): let the service run again here. */
  resume(): void
  progress(p: Progress): void
  /** Free-page reports from the service since the last call: [region, firstPage, pageCount] triples. */
  takeFreed(): number[]
}

export interface Progress {
  phase: 'connect' | 'precopy' | 'handoff' | 'postcopy' | 'recovering' | 'settled'
  round: number
  bytesSent: number
  bytesPerSec: number
  pagesLeft: number
  totalPages: number
}

/**
 * Pages the push policy picks per turn of the post-copy push loop (1 MiB):
 * page requests are read between turns. Smaller turns cut bubbling's runs
 * into small frames, whose per-frame costs on both sides slowed the push.
 */
const BATCH_PAGES = 256

/**
 * After the hand-off, frames carry at most 256 KiB: while a fault is open the
 * destination reads one bulk frame per turn of its loop, so the frame size is
 * what a fault's reply may wait behind (1 MiB frames doubled the fault p50).
 */
const POSTCOPY_FRAME_PAGES = 64

export class MigrationSource {
  private readonly layout: RegionLayout[]
  private readonly ps: number
  /** The destination holds the current version of these pages (data or zero). */
  private readonly destHas: PageBitmap[]
  /** Sent with payload at least once (to count resends). */
  private readonly everSent: PageBitmap[]
  /** After the hand-off: pages still to send, each exactly once. */
  private pending: PageBitmap[] = []
  private urgent!: Channel
  private bulk!: Channel
  private tracker: DirtyTracker | undefined
  private readonly zeroScratch = new Uint8Array(MAX_PAGES_PER_FRAME)
  private phase: Progress['phase'] = 'connect'
  private round = 0
  private pagesLeft = 0
  private readonly totalPages: number
  private policy!: PushPolicy
  private settledWaiter: { resolve: (stats: Record<string, unknown>) => void; reject: (e: Error) => void } | undefined
  private resumedAt: Promise<number> | undefined
  private resumedResolve: ((t: number) => void) | undefined
  private failure: Error | undefined
  private pushLog: { region: number; firstPage: number; pageCount: number }[] = []
  private readonly counts = {
    data: 0, zero: 0, free: 0, resent: 0, pushed: 0, demand: 0, discarded: 0,
  }
  private progressTimer: NodeJS.Timeout | undefined
  private handoffSent = false
  private session = ''
  /** Bumped when a link breaks in post-copy: work started on the old link stops. */
  private linkGeneration = 0
  private recoveries = 0
  private rateWindow = { t: 0, bytes: 0, rate: 0 }

  constructor(
    private readonly binding: NativeBinding,
    private readonly regions: Region[],
    private readonly opts: SourceOptions,
    private readonly hooks: SourceHooks,
  ) {
    this.ps = binding.pageSize
    this.layout = regions.map((r) => ({ pageCount: r.pageCount }))
    this.destHas = regions.map((r) => new PageBitmap(r.pageCount))
    this.everSent = regions.map((r) => new PageBitmap(r.pageCount))
    this.totalPages = regions.reduce((n, r) => n + r.pageCount, 0)
  }

  async run(): Promise<MigrationReport> {
    const t0 = nowMs()
    let paused = false
    this.progressTimer = setInterval(() => this.emitProgress(), 200)
    try {
      await this.connectBoth()
      const clock = await this.syncClock()
      const failed = this.attachLink()
      const rounds: RoundReport[] = []
      let precopyStop = 'postcopy'
      this.phase = 'precopy'
      if (this.opts.mode !== 'postcopy') precopyStop = await Promise.race([this.precopy(rounds), failed])
      else await Promise.race([this.zeroRound(rounds), failed])
      this.phase = 'handoff'
      const pauseAt = nowMs()
      // from here a failure before the hand-off resumes the service here,
      // even when pause() itself failed half-way
      paused = true
      const state = await Promise.race([this.hooks.pause(), failed])
      const discard = await Promise.race([this.handoff(state, rounds), failed])
      this.phase = 'postcopy'
      const postStart = nowMs()
      const [resumedAtDest, stats] = await this.postcopyWithRecovery(failed)
      this.phase = 'settled'
      const settledAt = nowMs()
      const rep = this.report(t0, settledAt, pauseAt, resumedAtDest - clock.offsetMs, clock, rounds, precopyStop, discard, stats, postStart)
      this.urgent.close()
      this.bulk.close()
      return rep
    } catch (err) {
      this.failure ??= err as Error
      this.urgent?.close()
      this.bulk?.close()
      // Once HANDOFF is on the wire the destination may already run the
      // service: resuming here too would run it twice.
      if (paused && !this.handoffSent) this.hooks.resume()
      if (this.handoffSent) {
        // The destination runs the service now: our copy is its only backing
        // store for the pages it lacks. Keep it; recovery is the caller's call.
        ;(err as UffdMigrateError).message += ' (after the hand-off: the source keeps its memory until the destination settles)'
      }
      throw err
    } finally {
      clearInterval(this.progressTimer)
      this.tracker?.close()
      this.tracker = undefined
    }
  }

  // ---- connect ---------------------------------------------------------------

  private async connectBoth(): Promise<void> {
    this.session = randomBytes(12).toString('hex')
    await this.openPair()
    this.bulk.send(encodeControl(Msg.REGIONS, {
      linkTimeoutMs: this.opts.linkTimeoutMs,
      pageSize: this.ps,
      mode: this.opts.mode,
      regions: this.regions.map((r) => ({ name: r.name, sizeBytes: r.sizeBytes })),
    }))
    const ok = await this.bulk.nextFrame()
    if (ok.type === Msg.ERROR) throw peerError(ok.payload)
    if (ok.type !== Msg.REGIONS_OK) throw migrationError(ErrorCode.PROTOCOL, `expected REGIONS_OK, got message type ${ok.type}`)
  }

  /** Routes both connections' frames to the handlers; the promise rejects when either breaks. */
  private attachLink(): Promise<never> {
    this.urgent.onFrame((f) => this.onUrgent(f))
    this.bulk.onFrame((f) => this.onBulk(f))
    const failed = new Promise<never>((_, reject) => {
      const onErr = (err: Error) => reject(this.failure ?? err)
      this.urgent.onClose(onErr)
      this.bulk.onClose(onErr)
    })
    failed.catch(() => {})
    return failed
  }

  /** Dials both connections of this session (urgent first: the destination pairs them by session). */
  private async openPair(): Promise<void> {
    const { host, port } = parseAddress(this.opts.to)
    const open = async (role: 'urgent' | 'bulk') => {
      const socket = await dial(host, port, this.opts.connectTimeoutMs)
      const ch = new Channel(socket, role)
      try {
        await clientHandshake(ch, this.opts.token, { role, session: this.session })
      } catch (err) {
        ch.close()
        throw err
      }
      return ch
    }
    const urgent = await open('urgent')
    try {
      this.bulk = await open('bulk')
    } catch (err) {
      urgent.close()
      throw err
    }
    this.urgent = urgent
    this.bulk.limitKernelBuffers(this.binding.setSocketBuffers, BULK_SOCKET_BUFFER_BYTES)
    for (const ch of [this.urgent, this.bulk]) ch.detectSilence(this.binding.setSocketLiveness, this.opts.linkTimeoutMs)
  }

  /** Destination clock minus ours, from the exchange with the smallest round trip. */
  private async syncClock(): Promise<{ offsetMs: number; rttMs: number }> {
    let best = { offsetMs: 0, rttMs: Infinity }
    for (let i = 0; i < 8; i++) {
      const t0 = nowMs()
      this.urgent.send(encodeControl(Msg.CLOCK, { t0 }))
      const f = await this.urgent.nextFrame()
      const t2 = nowMs()
      if (f.type === Msg.ERROR) throw peerError(f.payload)
      if (f.type !== Msg.CLOCK) throw migrationError(ErrorCode.PROTOCOL, `expected CLOCK, got message type ${f.type}`)
      const t1 = field<number>(decodeControl(f.type, f.payload), 't1', 'number', 'CLOCK')
      if (t2 - t0 < best.rttMs) best = { offsetMs: t1 - (t0 + t2) / 2, rttMs: t2 - t0 }
    }
    return best
  }

  // ---- pre-copy ----------------------------------------------------------------

  private async precopy(rounds: RoundReport[]): Promise<string> {
    this.tracker = new DirtyTracker(this.binding, this.regions)
    const hot = this.regions.map((r) => new PageBitmap(r.pageCount))
    const prevWritten = this.regions.map((r) => new PageBitmap(r.pageCount))
    let prevRemaining = Infinity
    let notShrinking = 0
    for (let round = 0; ; round++) {
      this.round = round
      const start = nowMs()
      const before = this.bulk.bytesWritten
      const rr: RoundReport = { round, dataPages: 0, zeroPages: 0, freePages: 0, hotPages: 0, bytes: 0, durationMs: 0 }
      rr.freePages = this.sendFreed(this.bulk)
      for (let i = 0; i < this.regions.length; i++) {
        const r = this.regions[i]
        const written = new PageBitmap(r.pageCount)
        if (round === 0) {
          // Round 0 sends every page that holds data; the rest are zero
          // ranges. Re-protect first so that writes from now on show up in round 1.
          this.tracker.collectWritten(r.id, r.pageCount)
          const present = this.tracker.presentRuns(r.id, r.pageCount)
          written.setRuns(present)
          rr.zeroPages += this.sendComplementAsZero(i, present, this.bulk)
        } else {
          written.setRuns(this.tracker.collectWritten(r.id, r.pageCount))
        }
        // Ma et al.: a page written in two consecutive rounds is hot and waits
        // for the hand-off; a hot page not written this round has cooled and goes now.
        const send = new PageBitmap(r.pageCount)
        const w = written.words, pw = prevWritten[i].words, h = hot[i].words, out = send.words
        for (let k = 0; k < w.length; k++) {
          const wasHot = h[k]
          out[k] = (w[k] & ~(pw[k] | wasHot)) | (wasHot & ~w[k])
          h[k] = w[k] & (pw[k] | wasHot)
          pw[k] = round === 0 ? 0 : w[k]
        }
        for (const [s, n] of send.runs()) {
          const { data, zero } = await this.sendRun(this.bulk, i, s, n, false)
          rr.dataPages += data
          rr.zeroPages += zero
        }
        rr.hotPages += hot[i].count()
      }
      this.bulk.send(encodeControl(Msg.ROUND_END, { round }))
      await this.bulk.drain()
      rr.bytes = this.bulk.bytesWritten - before
      rr.durationMs = nowMs() - start
      rounds.push(rr)
      this.emitProgress()
      if (round === 0) continue
      // Convergence: what is left (written this round + hot) must fit the
      // downtime budget at the rate this round achieved.
      const remaining = rr.dataPages + rr.hotPages
      const bytesPerMs = this.linkRate(rounds)
      const estimateMs = (remaining * this.ps) / bytesPerMs
      if (estimateMs <= this.opts.downtimeMs) return this.endPrecopy(hot, 'converged')
      notShrinking = remaining >= prevRemaining * 0.9 ? notShrinking + 1 : 0
      if (notShrinking >= 2) return this.endPrecopy(hot, 'not-converging')
      if (round >= this.opts.maxRounds) return this.endPrecopy(hot, 'round-limit')
      prevRemaining = remaining
    }
  }

  /**
   * Post-copy mode's only round: no data, just the zero and never-populated
   * pages as ranges, so that the destination never asks for them. Tracking
   * starts first: a zero page written before the hand-off lands in the
   * discard list like any stale page.
   */
  private async zeroRound(rounds: RoundReport[]): Promise<void> {
    this.tracker = new DirtyTracker(this.binding, this.regions)
    const start = nowMs()
    const before = this.bulk.bytesWritten
    const rr: RoundReport = { round: 0, dataPages: 0, zeroPages: 0, freePages: 0, hotPages: 0, bytes: 0, durationMs: 0 }
    for (let i = 0; i < this.regions.length; i++) {
      const r = this.regions[i]
      this.tracker.collectWritten(r.id, r.pageCount)
      const present = this.tracker.presentRuns(r.id, r.pageCount)
      rr.zeroPages += this.sendComplementAsZero(i, present, this.bulk)
      for (let k = 0; k < present.length; k += 2) {
        for (let base = present[k]; base < present[k] + present[k + 1]; base += MAX_PAGES_PER_FRAME) {
          const n = Math.min(MAX_PAGES_PER_FRAME, present[k] + present[k + 1] - base)
          const zeroRuns: number[] = []
          this.splitZero(r.id, base, n, (p, count, isZero) => {
            if (isZero) zeroRuns.push(p, count)
          })
          if (zeroRuns.length) rr.zeroPages += this.sendRanges(this.bulk, RangeKind.ZERO, i, zeroRuns)
        }
        if (this.bulk.needsDrain) await this.bulk.drain()
      }
    }
    this.bulk.send(encodeControl(Msg.PRECOPY_END, { reason: 'postcopy' }))
    await this.bulk.drain()
    rr.bytes = this.bulk.bytesWritten - before
    rr.durationMs = nowMs() - start
    rounds.push(rr)
  }

  /** Best bulk rate seen in a round big enough to measure it (bytes/ms). */
  private linkRate(rounds: RoundReport[]): number {
    let best = 100 * 1024 // 100 MB/s until measured
    for (const r of rounds) if (r.bytes >= 4 << 20) best = Math.max(best, r.bytes / Math.max(r.durationMs, 0.1))
    return best
  }

  private hotAtEnd: PageBitmap[] | undefined

  private endPrecopy(hot: PageBitmap[], why: string): string {
    this.hotAtEnd = hot
    this.bulk.send(encodeControl(Msg.PRECOPY_END, { reason: why }))
    return why
  }

  /** Pages of [0, pageCount) outside `present` runs go as zero ranges. */
  private sendComplementAsZero(region: number, present: Uint32Array, ch: Channel): number {
    const pages = this.layout[region].pageCount
    const runs: number[] = []
    let cursor = 0
    for (let k = 0; k <= present.length; k += 2) {
      const s = k < present.length ? present[k] : pages
      if (s > cursor) runs.push(cursor, s - cursor)
      if (k < present.length) cursor = present[k] + present[k + 1]
    }
    return this.sendRanges(ch, RangeKind.ZERO, region, runs)
  }

  /** Sends runs without payload, marking them current at the destination. */
  private sendRanges(ch: Channel, kind: RangeKind, region: number, runs: number[]): number {
    let pages = 0
    const perFrame = 8192 // run entries per frame: 32 KiB
    for (let k = 0; k < runs.length; k += perFrame) {
      const part = runs.slice(k, k + perFrame)
      ch.send(encodeRuns(Msg.RANGES, kind, region, part))
    }
    for (let k = 0; k < runs.length; k += 2) {
      this.destHas[region].setRange(runs[k], runs[k + 1])
      if (this.pending.length) this.pending[region].clearRange(runs[k], runs[k + 1])
      pages += runs[k + 1]
    }
    if (kind === RangeKind.FREE) this.counts.free += pages
    else this.counts.zero += pages
    return pages
  }

  /**
   * Sends one run of pages: all-zero pages as ranges, the rest as PAGES
   * frames that are views of the region's memory (no copy). After the
   * hand-off only pages still pending go: a page requested on the urgent
   * channel while this run waited for the bulk channel to drain is not sent twice.
   */
  private async sendRun(ch: Channel, region: number, first: number, count: number, afterHandoff: boolean): Promise<{ data: number; zero: number }> {
    const total = { data: 0, zero: 0 }
    const end = first + count
    const framePages = afterHandoff ? POSTCOPY_FRAME_PAGES : MAX_PAGES_PER_FRAME
    for (let base = first; base < end; base += framePages) {
      const chunkEnd = Math.min(end, base + framePages)
      if (!afterHandoff) {
        this.sendChunk(ch, region, base, chunkEnd - base, false, total)
      } else {
        const map = this.pending[region]
        for (let p = map.nextSet(base, chunkEnd); p !== -1; p = map.nextSet(p, chunkEnd)) {
          let q = map.nextClear(p, chunkEnd)
          if (q === -1) q = chunkEnd
          this.sendChunk(ch, region, p, q - p, true, total)
          p = q
        }
      }
      if (ch.needsDrain) await ch.drain()
    }
    return total
  }

  /** Sends at most MAX_PAGES_PER_FRAME pages, synchronously. */
  private sendChunk(ch: Channel, region: number, base: number, n: number, afterHandoff: boolean, total: { data: number; zero: number }): void {
    const r = this.regions[region]
    const zeroRuns: number[] = []
    this.splitZero(r.id, base, n, (p, count, isZero) => {
      if (isZero) {
        zeroRuns.push(p, count)
        total.zero += count
        return
      }
      ch.send([pagesHeader(region, p, count, this.ps), Buffer.from(r.buffer, p * this.ps, count * this.ps)])
      total.data += count
      this.counts.data += count
      this.counts.resent += count - this.everSent[region].setRange(p, count) // pages sent before
      this.destHas[region].setRange(p, count)
      if (afterHandoff) this.pending[region].clearRange(p, count)
    })
    if (zeroRuns.length) this.sendRanges(ch, RangeKind.ZERO, region, zeroRuns)
  }

  /** Splits [base, base+n) (n <= MAX_PAGES_PER_FRAME) into runs of all-zero and non-zero pages. */
  private splitZero(regionId: number, base: number, n: number, onRun: (first: number, count: number, isZero: boolean) => void): void {
    this.binding.zeroPages(regionId, base, n, this.zeroScratch)
    for (let i = 0; i < n; ) {
      const isZero = this.zeroScratch[i]
      let j = i + 1
      while (j < n && this.zeroScratch[j] === isZero) j++
      onRun(base + i, j - i, isZero === 1)
      i = j
    }
  }

  /** Free-page reports from the service: discarded here, sent as FREE ranges. */
  private sendFreed(ch: Channel): number {
    const triples = this.hooks.takeFreed()
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

  // ---- hand-off ------------------------------------------------------------------

  /** Final scan, discard list and state; returns how many pages were discarded. */
  private async handoff(state: Uint8Array, rounds: RoundReport[]): Promise<number> {
    const precopyMode = this.opts.mode === 'precopy'
    const final: RoundReport = { round: rounds.length, dataPages: 0, zeroPages: 0, freePages: 0, hotPages: 0, bytes: 0, durationMs: 0 }
    const start = nowMs()
    const before = this.bulk.bytesWritten
    final.freePages = this.sendFreed(this.bulk)
    const stale = this.regions.map((r) => new PageBitmap(r.pageCount))
    for (let i = 0; i < this.regions.length; i++) {
      const r = this.regions[i]
      stale[i].setRuns(this.tracker!.collectWritten(r.id, r.pageCount))
      if (this.hotAtEnd) for (const [s, n] of this.hotAtEnd[i].runs()) stale[i].setRange(s, n)
    }
    this.tracker?.close()
    this.tracker = undefined
    const discard: Uint32Array[] = []
    let discarded = 0
    for (let i = 0; i < this.regions.length; i++) {
      if (precopyMode) {
        for (const [s, n] of stale[i].runs()) {
          const { data, zero } = await this.sendRun(this.bulk, i, s, n, false)
          final.dataPages += data
          final.zeroPages += zero
        }
        discard.push(new Uint32Array(0))
        continue
      }
      // Stale pages the destination holds an old copy of are dropped there
      // (word-wise: stale ∩ destHas); every stale page is pending from now on.
      const has = this.destHas[i].words, st = stale[i].words
      for (let w = 0; w < has.length; w++) {
        st[w] &= has[w]
        has[w] &= ~st[w]
      }
      const runs: number[] = []
      for (const [s, n] of stale[i].runs()) {
        runs.push(s, n)
        discarded += n
      }
      discard.push(Uint32Array.from(runs))
    }
    if (!precopyMode) {
      this.setPending(this.destHas.map((has) => PageBitmap.complementOf(has.words, has.size)))
    }
    this.counts.discarded = discarded
    this.resumedAt = new Promise((resolve) => (this.resumedResolve = resolve))
    this.handoffSent = true
    this.bulk.send(encodeControl(Msg.HANDOFF, {
      state,
      discard: discard.map((d) => Buffer.from(d.buffer, d.byteOffset, d.byteLength)),
      pendingPages: this.pagesLeft,
      recoveryTimeoutMs: this.opts.recoveryTimeoutMs,
    }))
    await this.bulk.drain()
    final.bytes = this.bulk.bytesWritten - before
    final.durationMs = nowMs() - start
    if (final.dataPages || final.zeroPages || final.freePages) rounds.push(final)
    return discarded
  }

  // ---- post-copy --------------------------------------------------------------------

  /**
   * Post-copy until the destination has settled. A broken link is not the end
   * (the destination runs the service and this process holds the pages it
   * lacks): dial again for up to recoveryTimeoutMs with the same session,
   * learn what arrived (RECOVER_STATE) and push the rest.
   */
  private async postcopyWithRecovery(failed: Promise<never>): Promise<[number, Record<string, unknown>]> {
    for (;;) {
      try {
        return await Promise.race([Promise.all([this.resumedAt!, this.postcopy(this.linkGeneration)]), failed])
      } catch (err) {
        const code = (err as UffdMigrateError).code
        if (this.failure || code !== ErrorCode.CONNECTION || this.opts.recoveryTimeoutMs <= 0) throw err
        const back = await this.recover(err as Error)
        if (back.settled) return [await this.resumedAt!, back.settled] // it settled as the link broke
        failed = back.failed
      }
    }
  }

  /** Resolves with the new link's failure promise (boxed: an awaited promise would be unwrapped). */
  private async recover(cause: Error): Promise<{ failed: Promise<never>; settled?: Record<string, unknown> }> {
    this.linkGeneration++ // the push loop and the replies of the broken link stop
    this.urgent.close()
    this.bulk.close()
    this.recoveries++
    this.phase = 'recovering' // shown by progress; page requests are not legal until the link is back
    this.emitProgress()
    const deadline = nowMs() + this.opts.recoveryTimeoutMs
    let last = cause
    for (let attempt = 0; nowMs() < deadline; attempt++) {
      if (attempt > 0) await new Promise((r) => setTimeout(r, Math.min(1000, 100 * attempt)))
      try {
        await this.openPair()
        this.bulk.send(encodeControl(Msg.RECOVER, {}))
        const f = await this.bulk.nextFrame()
        if (f.type === Msg.ERROR) throw peerError(f.payload)
        if (f.type !== Msg.RECOVER_STATE) throw migrationError(ErrorCode.PROTOCOL, `expected RECOVER_STATE, got message type ${f.type}`)
        const m = decodeControl(f.type, f.payload)
        this.phase = 'postcopy'
        if (typeof m.resumedAtMs === 'number') this.resumedResolve?.(m.resumedAtMs)
        if (typeof m.settled === 'object' && m.settled !== null) return { failed: this.attachLink(), settled: m.settled as Record<string, unknown> }
        this.applyRecoverState(m)
        return { failed: this.attachLink() }
      } catch (err) {
        last = err as Error
        this.urgent?.close()
        this.bulk?.close()
        // the destination gave up or refused us: dialling again cannot help
        if ((err as UffdMigrateError).code !== ErrorCode.CONNECTION && (err as UffdMigrateError).code !== ErrorCode.CONNECT) break
      }
    }
    throw migrationError(
      ErrorCode.CONNECTION,
      `the connection broke during post-copy (${cause.message}) and could not be re-established within ${this.opts.recoveryTimeoutMs} ms: ${last.message}`,
    )
  }

  /** Pending from now on: every page the destination does not hold (pages lost in flight go again). */
  private applyRecoverState(m: Record<string, unknown>): void {
    const received = field<unknown[]>(m, 'received', 'array', 'RECOVER_STATE')
    if (received.length !== this.regions.length) throw migrationError(ErrorCode.PROTOCOL, `expected RECOVER_STATE.received for ${this.regions.length} regions`)
    this.setPending(this.regions.map((r, i) => {
      const bytes = received[i]
      const wordCount = Math.ceil(r.pageCount / 32)
      if (!(bytes instanceof Uint8Array) || bytes.length !== wordCount * 4) {
        throw migrationError(ErrorCode.PROTOCOL, `expected RECOVER_STATE.received[${i}] of ${wordCount * 4} bytes`)
      }
      // copied: msgpackr may hand out an unaligned view of a shared pool
      const has = new Uint32Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength))
      return PageBitmap.complementOf(has, r.pageCount)
    }))
  }

  /** Post-copy: what is still to send, and a fresh push policy over it. */
  private setPending(pending: PageBitmap[]): void {
    this.pending = pending
    this.pagesLeft = pending.reduce((n, m) => n + m.count(), 0)
    this.policy = createPushPolicy(this.opts.prepaging, pending)
  }

  private async postcopy(generation: number): Promise<Record<string, unknown>> {
    const settled = new Promise<Record<string, unknown>>((resolve, reject) => (this.settledWaiter = { resolve, reject }))
    settled.catch(() => {}) // observed below; a failure may end the push first
    if (this.pending.length) await this.pushLoop(generation)
    if (generation !== this.linkGeneration) return new Promise(() => {}) // that link broke; recover() took over
    this.bulk.send(encodeControl(Msg.PUSH_END, {}))
    return settled
  }

  private async pushLoop(generation: number): Promise<void> {
    for (;;) {
      if (this.failure) throw this.failure
      if (generation !== this.linkGeneration) return
      const runs = this.policy.next(BATCH_PAGES)
      if (runs.length === 0) {
        if (this.pagesLeft === 0) return
        // demand-only policy: wait for requests to drain the rest
        await new Promise((r) => setTimeout(r, 5))
        continue
      }
      for (const run of runs) {
        if (generation !== this.linkGeneration) return
        if (this.opts.pushLog) this.pushLog.push(run)
        const { data, zero } = await this.sendRun(this.bulk, run.region, run.firstPage, run.pageCount, true)
        this.counts.pushed += data + zero
        this.pagesLeft -= data + zero
      }
      // let page requests in between batches
      await new Promise((r) => setImmediate(r))
    }
  }

  private onUrgent(f: Frame): void {
    switch (f.type) {
      case Msg.PAGE_REQUEST: {
        if (this.phase !== 'postcopy') throw migrationError(ErrorCode.PROTOCOL, `PAGE_REQUEST is not legal in phase ${this.phase}`)
        const { kind, region, runs } = decodeRuns(f.type, f.payload, this.layout)
        void this.answerRequest(kind, region, runs)
        return
      }
      case Msg.WILL_NEED: {
        if (this.phase !== 'postcopy') return
        const { region, runs } = decodeRuns(f.type, f.payload, this.layout)
        for (let k = 0; k < runs.length; k += 2) this.policy.onHint(region, runs[k], runs[k + 1])
        return
      }
      case Msg.ERROR:
        throw peerError(f.payload)
      default:
        throw migrationError(ErrorCode.PROTOCOL, `unexpected message type ${f.type} on the urgent channel`)
    }
  }

  /**
   * Replies on the urgent channel with the requested pages still pending (a
   * page already pushed is in flight on the bulk channel and is not sent
   * twice), then REQUEST_DONE: while a request is open the destination reads
   * bulk data one frame per turn, so that a fault waits behind one pushed frame at most.
   */
  private async answerRequest(kind: number, region: number, runs: Uint32Array): Promise<void> {
    // the channel this request came on: after a break its replies go nowhere
    // (the destination asks again), never on the next link
    const ch = this.urgent, generation = this.linkGeneration
    const map = this.pending[region]
    for (let k = 0; k < runs.length; k += 2) {
      const first = runs[k], end = runs[k] + runs[k + 1]
      this.policy.onFault(region, first)
      for (let p = map.nextSet(first, end); p !== -1 && generation === this.linkGeneration; p = map.nextSet(p, end)) {
        let q = map.nextClear(p, end)
        if (q === -1) q = end
        const { data, zero } = await this.sendRun(ch, region, p, q - p, true)
        this.counts.demand += data + zero
        this.pagesLeft -= data + zero
        p = q
      }
    }
    if (generation === this.linkGeneration) ch.send(encodeControl(Msg.REQUEST_DONE, { kind }))
  }

  private onBulk(f: Frame): void {
    switch (f.type) {
      case Msg.RESUMED: {
        if (this.phase !== 'handoff' && this.phase !== 'postcopy') throw migrationError(ErrorCode.PROTOCOL, `RESUMED is not legal in phase ${this.phase}`)
        this.resumedResolve?.(field<number>(decodeControl(f.type, f.payload), 'resumedAtMs', 'number', 'RESUMED'))
        return
      }
      case Msg.FREED: {
        // The destination freed pages during post-copy: it zero-fills them; never push them.
        const { region, runs } = decodeRuns(f.type, f.payload, this.layout)
        for (let k = 0; k < runs.length; k += 2) {
          const n = this.pending[region]?.clearRange(runs[k], runs[k + 1]) ?? 0
          this.pagesLeft -= n
          this.counts.free += n
        }
        return
      }
      case Msg.SETTLED: {
        if (this.phase !== 'postcopy' && this.phase !== 'handoff') throw migrationError(ErrorCode.PROTOCOL, `SETTLED is not legal in phase ${this.phase}`)
        this.settledWaiter?.resolve(decodeControl(f.type, f.payload))
        return
      }
      case Msg.ERROR: {
        const err = peerError(f.payload)
        this.failure = err
        this.settledWaiter?.reject(err)
        throw err
      }
      default:
        throw migrationError(ErrorCode.PROTOCOL, `unexpected message type ${f.type} on the bulk channel`)
    }
  }

  // ---- report -------------------------------------------------------------------------

  private emitProgress(): void {
    const now = nowMs()
    const bytes = (this.bulk?.bytesWritten ?? 0) + (this.urgent?.bytesWritten ?? 0)
    if (this.rateWindow.t) this.rateWindow.rate = ((bytes - this.rateWindow.bytes) / (now - this.rateWindow.t)) * 1000
    this.rateWindow.t = now
    this.rateWindow.bytes = bytes
    this.hooks.progress({
      phase: this.phase, round: this.round, bytesSent: bytes, bytesPerSec: this.rateWindow.rate,
      pagesLeft: this.phase === 'postcopy' || this.phase === 'recovering' ? this.pagesLeft : this.totalPages - this.destHas.reduce((n, m) => n + m.count(), 0),
      totalPages: this.totalPages,
    })
  }

  private report(
    t0: number, settledAt: number, pauseAt: number, resumedAt: number, clock: { offsetMs: number; rttMs: number },
    rounds: RoundReport[], precopyStop: string, discarded: number, stats: Record<string, unknown>, postStart: number,
  ): MigrationReport {
    const num = (k: string) => (typeof stats[k] === 'number' ? (stats[k] as number) : 0)
    const lat = (typeof stats.faultLatencyUs === 'object' && stats.faultLatencyUs) as MigrationReport['postcopy']['faultLatencyUs'] | false
    return {
      mode: this.opts.mode,
      to: this.opts.to,
      regions: this.regions.map((r) => ({ name: r.name, sizeBytes: r.sizeBytes })),
      pageSize: this.ps,
      rounds,
      precopyStop,
      totalMs: settledAt - t0,
      downtimeMs: resumedAt - pauseAt,
      clockOffsetMs: clock.offsetMs,
      clockRttMs: clock.rttMs,
      bytesOnWire: this.bulk.bytesWritten + this.urgent.bytesWritten + this.bulk.bytesRead + this.urgent.bytesRead,
      pages: { data: this.counts.data, zero: this.counts.zero, free: this.counts.free },
      pagesResent: this.counts.resent,
      // the source cannot send a page twice by construction (pending map);
      // the destination counts what it actually received twice
      pagesSentTwiceAfterHandoff: num('pagesReceivedTwice'),
      discardedPages: discarded,
      postcopy: {
        strategy: this.opts.mode === 'precopy' ? 'none' : this.policy?.name ?? 'none',
        networkFaults: num('networkFaults'),
        localZeroFaults: num('localZeroFaults'),
        networkFaultsOnZeroPages: num('networkFaultsOnZeroPages'),
        faultLatencyUs: lat || { count: 0, p50: 0, p99: 0, max: 0, mean: 0 },
        pushedPages: this.counts.pushed,
        demandPages: this.counts.demand,
        timeToSettledMs: settledAt - postStart,
        recoveries: this.recoveries,
        ...(this.opts.pushLog ? { pushLog: this.pushLog } : {}),
      },
    }
  }
}

/** Connects, retrying refused connections until timeoutMs (the destination may still be starting). */
async function dial(host: string, port: number, timeoutMs: number): Promise<Socket> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    try {
      return await dialOnce(host, port, Math.max(1, deadline - Date.now()))
    } catch (err) {
      const code = ((err as UffdMigrateError).cause as NodeJS.ErrnoException | undefined)?.code
      if (code !== 'ECONNREFUSED' || Date.now() + 100 >= deadline) throw err
      await new Promise((r) => setTimeout(r, 100))
    }
  }
}

function dialOnce(host: string, port: number, timeoutMs: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = connect({ host, port })
    const timer = setTimeout(() => {
      s.destroy()
      reject(migrationError(ErrorCode.CONNECT, `could not connect to ${host}:${port} within ${timeoutMs} ms: is \`uffd-migrate receive\` listening there?`))
    }, timeoutMs)
    s.once('connect', () => {
      clearTimeout(timer)
      resolve(s)
    })
    s.once('error', (err: NodeJS.ErrnoException) => {
      clearTimeout(timer)
      reject(migrationError(ErrorCode.CONNECT, `could not connect to ${host}:${port}: ${err.code ?? err.message}; is \`uffd-migrate receive --listen ${host}:${port}\` running on the destination?`, err))
    })
  })
}
