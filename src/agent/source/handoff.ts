/**
 * The hand-off on the source, after the service's pause(): a final scan,
 * then either every remaining page (precopy: the downtime grows with them)
 * or the discard list (post-copy, hybrid: pages the destination holds an
 * old copy of, dropped there so that they fault and are fetched fresh),
 * then HANDOFF with the service's state. Hybrid sends the pages written
 * since its last round in the window instead when they are few (see
 * sendWrittenInWindow()), and drops only the rest. Nothing in the pause window is
 * O(memory) but the final scan's page-table walk: what the bitmaps need
 * (the hot runs, what the destination lacks) is prepared before pause()
 * (prepareHandoff), and the discard lists cost O(stale pages). commit()
 * runs just before HANDOFF goes on the wire: from then on the service may
 * run on the destination.
 */
import { PageBitmap } from '../../bitmap'
import { convergenceRate } from './precopy'
import type { Channel } from '../../protocol/channel'
import { encodeControl, Msg } from '../../protocol/messages'
import type { Region } from '../../region'
import type { Clock } from '../clock'
import type { MigrationMode, RoundReport } from '../report'
import type { DirtyTracker } from '../tracker'
import type { Sender } from './sender'

export interface HandoffContext {
  regions: Region[]
  bulk: Channel
  sender: Sender
  tracker: DirtyTracker
  clock: Clock
  mode: MigrationMode
  /** What the link gives the hand-off (0 or absent: the rounds' measured rate; convergenceRate()). */
  switchoverBytesPerSec?: number
  recoveryTimeoutMs: number
  /** The destination's agent thread runs at this nice value once the service runs there (src/agent/yielding.ts); forward: the service's clients are forwarded there. */
  postcopyNice: number
  forward: boolean
  takeFreed(): number[]
  /** discarded: pages the destination drops now; missing: pages it lacks when the service resumes there (the report's figures). */
  commit(discarded: number, missing: number): void
  /** HANDOFF is queued: what post-copy needs before the destination's first page request (it overlaps HANDOFF's way there). */
  handedOver(): void
  /** Source-clock stamps of the pause window, for the report's downtime breakdown. */
  marks: { scannedAt?: number; sentAt?: number }
}

/** Stale pages in the destination's copy: the pages of these run lists that destHas holds; they leave destHas. O(pages in the lists). */
export function discardRuns(destHas: PageBitmap, lists: (ArrayLike<number> | undefined)[]): Uint32Array {
  const runs: number[] = []
  for (const list of lists) {
    if (!list) continue
    for (let k = 0; k < list.length; k += 2) {
      for (let p = list[k], end = p + list[k + 1]; p < end; p++) {
        if (!destHas.has(p)) continue
        destHas.clear(p)
        const n = runs.length
        if (n && runs[n - 2] + runs[n - 1] === p) runs[n - 1]++
        else runs.push(p, 1)
      }
    }
  }
  return Uint32Array.from(runs)
}

/**
 * Hybrid: the pages written since the last round that the destination holds
 * an old copy of go in the pause window, overwritten in place there, when
 * they take at most this long at the rate the rounds measured. Dropping them
 * instead costs a discard per page in the window (15-34 us a page on the
 * development VM, more in larger regions: most of what the 4 GiB hand-off
 * added) and a fault per page after the resume, on pages the service has
 * just written and is likely to touch again.
 */
export const WINDOW_SEND_MS = 2

/** Runs of `written` (first, count pairs) that destHas holds, and how many pages they are. */
export function heldRuns(destHas: PageBitmap, written: ArrayLike<number>): { runs: [number, number][]; pages: number } {
  const runs: [number, number][] = []
  let pages = 0
  for (let k = 0; k < written.length; k += 2) {
    destHas.eachRun(written[k], written[k] + written[k + 1], (p, q, held) => {
      if (!held) return
      runs.push([p, q - p])
      pages += q - p
    })
  }
  return { runs, pages }
}

/** Whether `pages` pages go in the window: their transfer at `bytesPerMs` fits WINDOW_SEND_MS. */
export function sendWrittenInWindow(pages: number, pageSize: number, bytesPerMs: number): boolean {
  return pages > 0 && (pages * pageSize) / bytesPerMs <= WINDOW_SEND_MS
}

/** What the hand-off needs that is O(memory), computed after the last round and before pause(), while the service runs. */
export interface HandoffPrep {
  /** The pages held back as hot (precopy, hybrid): precopy sends them in the window, as a bitmap. */
  hot: PageBitmap[] | undefined
  /** The same as runs (hybrid): what the discard lists walk. */
  hotRuns: Uint32Array[] | undefined
  /** Post-copy, hybrid: the pages the destination lacks now (every page, once the discard list is added, to be sent once). */
  lacking: PageBitmap[] | undefined
  lackingCount: number
}

export function prepareHandoff(sender: Sender, mode: MigrationMode, hot: PageBitmap[] | undefined): HandoffPrep {
  if (mode === 'precopy') return { hot, hotRuns: undefined, lacking: undefined, lackingCount: 0 }
  const hotRuns = hot?.map((h) => {
    const runs: number[] = []
    for (const [s, n] of h.runs()) runs.push(s, n)
    return Uint32Array.from(runs)
  })
  // nothing reaches the destination between here and the hand-off: PRECOPY_END is sent
  const lacking = sender.destHas.map((has) => PageBitmap.complementOf(has.words, has.size))
  return { hot, hotRuns, lacking, lackingCount: lacking.reduce((n, m) => n + m.count(), 0) }
}

/** Sends the hand-off; returns how many pages the destination discards. */
export async function sendHandoff(ctx: HandoffContext, state: Uint8Array, prep: HandoffPrep, rounds: RoundReport[]): Promise<number> {
  const { regions, sender, bulk } = ctx
  const precopyMode = ctx.mode === 'precopy'
  const final: RoundReport = { round: rounds.length, dataPages: 0, zeroPages: 0, freePages: 0, hotPages: 0, bytes: 0, durationMs: 0 }
  const start = ctx.clock.now()
  const before = bulk.bytesWritten + sender.laneBytes
  // pages from now on on bulk alone, in order with HANDOFF: the extra streams were drained before the pause (pre-copy
  // ends with a barrier), so their retirement costs no round trip here; over a stream slower than bulk, what went on
  // the streams in the window made HANDOFF wait for that stream's SYNC (a 250 ms lag: ~260 ms of downtime)
  await sender.barrier(false)
  const freed = ctx.takeFreed()
  final.freePages = sender.sendFreed(bulk, freed)
  // freed pages read as zero there now: not lacking any more
  if (prep.lacking) for (let k = 0; k < freed.length; k += 3) prep.lackingCount -= prep.lacking[freed[k]].clearRange(freed[k + 1], freed[k + 2])
  const written = regions.map((r) => ctx.tracker.peekWritten(r.id, r.pageCount))
  // write tracking is not ended here: that is O(memory) (see tracking.ts)
  ctx.marks.scannedAt = ctx.clock.now()
  const discard: Uint32Array[] = []
  const windowSends: Promise<void>[] = []
  let discarded = 0
  // (on bulk alone since the barrier above, whatever the streams: over several the window's pages once travelled on
  // their lanes and HANDOFF waited for each stream's reader to place its share: 256 MiB, 10k writes/s, 3 streams, 5 runs
  // each, transfer part 3.1-15.9 ms, median 6.6, against 2.4-3.7, median 3.3, when they were dropped instead)
  const held = ctx.mode === 'hybrid' ? written.map((w, i) => heldRuns(sender.destHas[i], w)) : undefined
  const sendNow = held !== undefined && sendWrittenInWindow(held.reduce((n, h) => n + h.pages, 0), sender.pageSize, convergenceRate(rounds, ctx.switchoverBytesPerSec).bytesPerSec / 1000)
  for (let i = 0; i < regions.length; i++) {
    if (precopyMode) {
      // every page goes now, once: written ∪ hot, in order (the hot map is not needed after this)
      const stale = prep.hot?.[i] ?? new PageBitmap(regions[i].pageCount)
      stale.setRuns(written[i])
      // the service is paused: no turns of the agent's loop in between (yieldToLoop false)
      const { data, zero } = await sender.sendRuns(bulk, i, stale.runs(), false, false)
      final.dataPages += data
      final.zeroPages += zero
      discard.push(new Uint32Array(0))
      continue
    }
    if (sendNow) {
      // overwritten in place there (the destination is still in pre-copy until HANDOFF); they stay in destHas.
      // Through the native writer they are queued ahead of HANDOFF at once and not waited for here: its answer is a
      // round trip between threads (1-2 ms of the window, stamped at 256 MiB and 4 GiB); in JS each run goes in turn.
      const sending = sender.sendRuns(bulk, i, held![i].runs, false, false).then(({ data, zero }) => {
        final.dataPages += data
        final.zeroPages += zero
      })
      if (sender.queuesNatively(bulk)) windowSends.push(sending)
      else await sending
    }
    const runs = discardRuns(sender.destHas[i], sendNow ? [prep.hotRuns?.[i]] : [written[i], prep.hotRuns?.[i]])
    for (let k = 1; k < runs.length; k += 2) discarded += runs[k]
    prep.lacking![i].setRuns(runs)
    discard.push(runs)
  }
  // every page the destination lacks is pending from now on, each to be sent once
  if (!precopyMode) sender.setPending(prep.lacking!, prep.lackingCount + discarded)
  ctx.commit(discarded, precopyMode ? 0 : sender.pagesLeft)
  bulk.send(encodeControl(Msg.HANDOFF, {
    state,
    discard: discard.map((d) => Buffer.from(d.buffer, d.byteOffset, d.byteLength)),
    recoveryTimeoutMs: ctx.recoveryTimeoutMs,
    postcopyNice: ctx.postcopyNice,
    ...(ctx.forward ? { forward: true } : {}),
  }))
  ctx.handedOver()
  await Promise.all(windowSends)
  await bulk.drain()
  ctx.marks.sentAt = ctx.clock.now()
  final.bytes = bulk.bytesWritten + sender.laneBytes - before
  final.durationMs = ctx.clock.now() - start
  if (final.dataPages || final.zeroPages || final.freePages) rounds.push(final)
  return discarded
}
