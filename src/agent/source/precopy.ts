/**
 * Pre-copy rounds while the service runs (Ma et al.): round 0 sends every
 * page that holds data (the rest as zero ranges); round k sends the pages
 * written since round k-1, except hot pages (written in consecutive rounds),
 * which wait for the hand-off. The maths is pure (splitHot, converged) and
 * tested without a kernel; the round loop drives the tracker and the sender.
 */
import { PageBitmap } from '../../bitmap'
import type { Channel } from '../../protocol/channel'
import { encodeControl, MAX_PAGES_PER_FRAME, Msg, RangeKind } from '../../protocol/messages'
import type { Region } from '../../region'
import type { Clock } from '../clock'
import type { MigrationMode, RoundReport } from '../report'
import type { DirtyTracker } from '../tracker'
import type { Sender } from './sender'
import type { Runs } from './writer-batches'

/**
 * One round's split, word by word over the bitmaps (updated in place):
 * send = written now and not in the previous round nor hot, or hot and not
 * written now (it cooled); hot = written now and (in the previous round or
 * hot); prevWritten = written now (nothing after round 0, which sends all).
 */
export function splitHot(written: PageBitmap, prevWritten: PageBitmap, hot: PageBitmap, round: number): PageBitmap {
  const send = new PageBitmap(written.size)
  const w = written.words, pw = prevWritten.words, h = hot.words, out = send.words
  for (let k = 0; k < w.length; k++) {
    const wasHot = h[k]
    out[k] = (w[k] & ~(pw[k] | wasHot)) | (wasHot & ~w[k])
    h[k] = w[k] & (pw[k] | wasHot)
    pw[k] = round === 0 ? 0 : w[k]
  }
  return send
}

export type PrecopyStop = 'converged' | 'not-converging' | 'round-limit'

export interface ConvergenceState {
  /** Data + hot pages left after the previous round (Infinity before round 1). */
  prevRemaining: number
  /** Consecutive rounds that did not shrink what is left by 10 %. */
  notShrinking: number
}

/**
 * After round >= 1: stop when what is left (written this round + hot) fits the
 * downtime budget at the measured rate, when it stopped shrinking for two
 * rounds, or at the round limit; undefined: run another round. Updates state.
 */
export function converged(
  state: ConvergenceState, round: number, remainingPages: number, pageSize: number, bytesPerMs: number, downtimeMs: number, maxRounds: number,
): PrecopyStop | undefined {
  if ((remainingPages * pageSize) / bytesPerMs <= downtimeMs) return 'converged'
  state.notShrinking = remainingPages >= state.prevRemaining * 0.9 ? state.notShrinking + 1 : 0
  if (state.notShrinking >= 2) return 'not-converging'
  if (round >= maxRounds) return 'round-limit'
  state.prevRemaining = remainingPages
  return undefined
}

/**
 * Best bulk rate seen in a round big enough to measure it (bytes/ms; 100 MB/s until one was). What was measured
 * wins even when slower: a link (or a limit) under 100 MB/s would otherwise converge on a budget it cannot keep.
 */
export function linkRate(rounds: RoundReport[]): number {
  let best = 0
  for (const r of rounds) if (r.bytes >= 4 << 20) best = Math.max(best, r.bytes / Math.max(r.durationMs, 0.1))
  return best || 100 * 1024
}

/** The rate the convergence check expects of the stop-and-copy, and where it came from. */
export interface ConvergenceRate {
  bytesPerSec: number
  from: 'measured' | 'switchover-bandwidth'
}

/**
 * The operator's switchover bandwidth when given (QEMU's avail-switchover-bandwidth: under a pre-copy limit the
 * rounds measure the limit, but the hand-off is never limited), else the best rate the rounds measured.
 */
export function convergenceRate(rounds: RoundReport[], switchoverBytesPerSec: number | undefined): ConvergenceRate {
  return switchoverBytesPerSec
    ? { bytesPerSec: switchoverBytesPerSec, from: 'switchover-bandwidth' }
    : { bytesPerSec: Math.round(linkRate(rounds) * 1000), from: 'measured' }
}

export interface PrecopyContext {
  regions: Region[]
  pageSize: number
  bulk: Channel
  sender: Sender
  tracker: DirtyTracker
  clock: Clock
  mode: MigrationMode
  downtimeMs: number
  maxRounds: number
  /** Bytes a second the hand-off can expect (0 or absent: the rounds' measured rate); see convergenceRate(). */
  switchoverBytesPerSec?: number
  /** Free-page reports from the service since the last call. */
  takeFreed(): number[]
  /** Resolves when the destination answers SYNC (it applied everything sent before on bulk). */
  sync(): Promise<unknown>
  onRound(round: number): void
}

export interface PrecopyResult {
  stop: string
  /** Hot pages at the end: they go at the hand-off. */
  hot: PageBitmap[] | undefined
  /** The rate the last convergence check used (absent in post-copy mode, which has none). */
  rate?: ConvergenceRate
}

/** Rounds until convergence (precopy, hybrid) or the zero round (postcopy); PRECOPY_END sent. */
export async function runPrecopy(ctx: PrecopyContext, rounds: RoundReport[]): Promise<PrecopyResult> {
  if (ctx.mode === 'postcopy') {
    await zeroRound(ctx, rounds)
    return { stop: 'postcopy', hot: undefined }
  }
  const { regions, sender, tracker, bulk } = ctx
  const hot = regions.map((r) => new PageBitmap(r.pageCount))
  const prevWritten = regions.map((r) => new PageBitmap(r.pageCount))
  const state: ConvergenceState = { prevRemaining: Infinity, notShrinking: 0 }
  for (let round = 0; ; round++) {
    ctx.onRound(round)
    const started = startRound(ctx, round)
    const rr = started.rr
    rr.freePages = sender.sendFreed(bulk, ctx.takeFreed())
    for (let i = 0; i < regions.length; i++) {
      const r = regions[i]
      let toSend: Runs
      if (round === 0) {
        // Round 0 sends every page that holds data; the rest are zero
        // ranges. Re-protect first so that writes from now on show up in round 1.
        tracker.collectWritten(r.id, r.pageCount)
        const present = tracker.presentRuns(r.id, r.pageCount)
        rr.zeroPages += sender.sendComplementAsZero(bulk, i, present)
        // as the scan returned them: nothing is hot in round 0 (splitHot() would give the same runs back, through a
        // bitmap), and the writer takes them in slices (writer-batches.ts)
        toSend = present
      } else {
        const written = new PageBitmap(r.pageCount)
        written.setRuns(tracker.collectWritten(r.id, r.pageCount))
        toSend = splitHot(written, prevWritten[i], hot[i], round).runs()
      }
      // a round can go by without the socket ever asking to drain (4 MiB buffers): sendRuns lets the agent's
      // loop take messages (a cancel) now and then, not only at the end of the round
      const { data, zero } = await sender.sendRuns(bulk, i, toSend, false)
      rr.dataPages += data
      rr.zeroPages += zero
      // hot pages wait for the hand-off; with post-copy after it (hybrid) the destination drops its old copies
      // now, not in the pause window (precopy overwrites them in place at the hand-off)
      if (round > 0 && ctx.mode === 'hybrid') rr.stalePages = (rr.stalePages ?? 0) + sender.sendStale(bulk, i, hot[i])
      rr.hotPages += hot[i].count()
    }
    bulk.send(encodeControl(Msg.ROUND_END, { round }))
    await endRound(ctx, started, rounds)
    if (round === 0) continue
    const rate = convergenceRate(rounds, ctx.switchoverBytesPerSec)
    const stop = converged(state, round, rr.dataPages + rr.hotPages, ctx.pageSize, rate.bytesPerSec / 1000, ctx.downtimeMs, ctx.maxRounds)
    if (stop) {
      if (ctx.mode === 'hybrid') rr.stalePages = (rr.stalePages ?? 0) + (await dropUntilQuiet(ctx))
      await appliedAtDestination(ctx)
      bulk.send(encodeControl(Msg.PRECOPY_END, { reason: stop }))
      return { stop, hot, rate }
    }
  }
}

/**
 * Hybrid, after the last round: what was written during it goes post-copy
 * anyway, so the destination drops its old copies (STALE) while the service
 * still runs here, and says when it is done (SYNC); what was written
 * meanwhile is dropped the same way, a few times, each pass shorter (drops
 * cost ~10-20 µs a page, writes come slower). The hand-off's discard list,
 * applied in the pause window, then holds only the last few pages.
 */
async function dropUntilQuiet(ctx: PrecopyContext): Promise<number> {
  const { regions, tracker, sender, bulk } = ctx
  let total = 0
  for (let pass = 0; pass < 4; pass++) {
    let dropped = 0
    for (let i = 0; i < regions.length; i++) {
      const written = new PageBitmap(regions[i].pageCount)
      written.setRuns(tracker.collectWritten(regions[i].id, regions[i].pageCount))
      dropped += sender.sendStale(bulk, i, written)
    }
    total += dropped
    if (dropped === 0) break
    await appliedAtDestination(ctx) // the drops sent on extra streams too
    if (dropped < 256) break
  }
  return total
}

/**
 * Waits (the service still running) until the destination has applied everything sent so far, on every stream.
 * Before the pause: the rounds' tail can still be in flight (kernel buffers, a shaped link's queue), and HANDOFF
 * would wait behind it in the pause window (30-50 ms of a 1 Gbit/s link's downtime, measured).
 */
async function appliedAtDestination(ctx: PrecopyContext): Promise<void> {
  await ctx.sender.barrier(true)
  ctx.bulk.send(encodeControl(Msg.SYNC, {}))
  await ctx.sync()
}

/**
 * Post-copy mode's only round: no data, just the zero and never-populated
 * pages as ranges, so that the destination never asks for them. A zero page
 * written before the hand-off lands in the discard list like any stale page.
 */
async function zeroRound(ctx: PrecopyContext, rounds: RoundReport[]): Promise<void> {
  const { regions, sender, tracker, bulk } = ctx
  const started = startRound(ctx, 0)
  const rr = started.rr
  for (let i = 0; i < regions.length; i++) {
    const r = regions[i]
    tracker.collectWritten(r.id, r.pageCount)
    const present = tracker.presentRuns(r.id, r.pageCount)
    rr.zeroPages += sender.sendComplementAsZero(bulk, i, present)
    for (let k = 0; k < present.length; k += 2) {
      for (let base = present[k]; base < present[k] + present[k + 1]; base += MAX_PAGES_PER_FRAME) {
        const n = Math.min(MAX_PAGES_PER_FRAME, present[k] + present[k + 1] - base)
        const zeroRuns: number[] = []
        sender.splitZero(r.id, base, n, (p, count, isZero) => {
          if (isZero) zeroRuns.push(p, count)
        })
        if (zeroRuns.length) rr.zeroPages += sender.sendRanges(bulk, RangeKind.ZERO, i, zeroRuns)
      }
      if (bulk.needsDrain) await bulk.drain()
    }
  }
  // the ranges that went on extra streams are placed before the pause (a SYNC answered on each), so that the pause
  // window waits on none of them (with the streams 150 ms behind bulk, the downtime was ~158 ms)
  await sender.barrier(true)
  bulk.send(encodeControl(Msg.PRECOPY_END, { reason: 'postcopy' }))
  await endRound(ctx, started, rounds)
}

interface RoundStart {
  rr: RoundReport
  t: number
  bytes: number
}

function startRound(ctx: PrecopyContext, round: number): RoundStart {
  const rr: RoundReport = { round, dataPages: 0, zeroPages: 0, freePages: 0, hotPages: 0, bytes: 0, durationMs: 0 }
  return { rr, t: ctx.clock.now(), bytes: ctx.bulk.bytesWritten + ctx.sender.laneBytes }
}

async function endRound(ctx: PrecopyContext, start: RoundStart, rounds: RoundReport[]): Promise<void> {
  await ctx.sender.drain(ctx.bulk)
  start.rr.bytes = ctx.bulk.bytesWritten + ctx.sender.laneBytes - start.bytes
  start.rr.durationMs = ctx.clock.now() - start.t
  rounds.push(start.rr)
}
