/**
 * The hand-off on the source, after the service's pause(): a final scan,
 * then either every remaining page (precopy: the downtime grows with them)
 * or the discard list (post-copy, hybrid: pages the destination holds an
 * old copy of, dropped there so that they fault and are fetched fresh),
 * then HANDOFF with the service's state. Nothing here is O(memory) but the
 * final scan's page-table walk. commit() runs just before HANDOFF
 * goes on the wire: from then on the service may run on the destination.
 */
import { PageBitmap } from '../../bitmap'
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
  recoveryTimeoutMs: number
  takeFreed(): number[]
  /** discarded: pages the destination drops now; missing: pages it lacks when the service resumes there (the report's figures). */
  commit(discarded: number, missing: number): void
  /** Source-clock stamps of the pause window, for the report's downtime breakdown. */
  marks: { scannedAt?: number; sentAt?: number }
}

/** Stale pages in the destination's copy: stale ∩ destHas, word-wise; they leave destHas. Returns their runs. */
export function discardRuns(stale: PageBitmap, destHas: PageBitmap): Uint32Array {
  const has = destHas.words, st = stale.words
  for (let w = 0; w < has.length; w++) {
    st[w] &= has[w]
    has[w] &= ~st[w]
  }
  const runs: number[] = []
  for (const [s, n] of stale.runs()) runs.push(s, n)
  return Uint32Array.from(runs)
}

/** Sends the hand-off; returns how many pages the destination discards. */
export async function sendHandoff(ctx: HandoffContext, state: Uint8Array, hotAtEnd: PageBitmap[] | undefined, rounds: RoundReport[]): Promise<number> {
  const { regions, sender, bulk } = ctx
  const precopyMode = ctx.mode === 'precopy'
  const final: RoundReport = { round: rounds.length, dataPages: 0, zeroPages: 0, freePages: 0, hotPages: 0, bytes: 0, durationMs: 0 }
  const start = ctx.clock.now()
  const before = bulk.bytesWritten
  final.freePages = sender.sendFreed(bulk, ctx.takeFreed())
  const stale = regions.map((r, i) => {
    const map = new PageBitmap(r.pageCount)
    map.setRuns(ctx.tracker.peekWritten(r.id, r.pageCount))
    if (hotAtEnd) for (const [s, n] of hotAtEnd[i].runs()) map.setRange(s, n)
    return map
  })
  // write tracking is not ended here: that is O(memory) (see MigrationSource.closeTracker())
  ctx.marks.scannedAt = ctx.clock.now()
  const discard: Uint32Array[] = []
  let discarded = 0
  for (let i = 0; i < regions.length; i++) {
    if (precopyMode) {
      for (const [s, n] of stale[i].runs()) {
        const { data, zero } = await sender.sendRun(bulk, i, s, n, false)
        final.dataPages += data
        final.zeroPages += zero
      }
      discard.push(new Uint32Array(0))
      continue
    }
    const runs = discardRuns(stale[i], sender.destHas[i])
    for (let k = 1; k < runs.length; k += 2) discarded += runs[k]
    discard.push(runs)
  }
  // every page the destination lacks is pending from now on, each to be sent once
  if (!precopyMode) sender.setPending(sender.destHas.map((has) => PageBitmap.complementOf(has.words, has.size)))
  ctx.commit(discarded, precopyMode ? 0 : sender.pagesLeft)
  bulk.send(encodeControl(Msg.HANDOFF, {
    state,
    discard: discard.map((d) => Buffer.from(d.buffer, d.byteOffset, d.byteLength)),
    recoveryTimeoutMs: ctx.recoveryTimeoutMs,
  }))
  await bulk.drain()
  ctx.marks.sentAt = ctx.clock.now()
  final.bytes = bulk.bytesWritten - before
  final.durationMs = ctx.clock.now() - start
  if (final.dataPages || final.zeroPages || final.freePages) rounds.push(final)
  return discarded
}
