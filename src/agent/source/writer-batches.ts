/**
 * Runs of pages handed to native writers (bulk-writer.ts) in batches: a few
 * batches in flight per writer, enough to keep its thread busy and little
 * to drop on a cancel. Over parallel streams every run is split by lane
 * (lanes.ts) and each writer gets its lane's share.
 */
import type { BatchResult, NativeBulkSend } from './bulk-writer'
import { splitByLane } from './lanes'

/**
 * Pages per batch handed to a native writer (so at most as many runs), and batches in flight: enough to keep it
 * busy, little to drop on a cancel.
 */
const WRITER_BATCH_PAGES = 2048
const WRITER_BATCHES_IN_FLIGHT = 2

/** (first, count) pairs: a flat Uint32Array (as a scan returns them), or pairs one by one. */
export type Runs = Uint32Array | Iterable<[number, number]>

export interface BatchOptions {
  framePages: number
  /** After the hand-off: the writer takes the pages from the pending map (each at most once). */
  takePending: boolean
  /** false (the pause window): every batch is queued before this returns, none awaited in between. */
  yieldToLoop: boolean
  /** The channel failed: stop handing over. */
  failed(): boolean
}

/**
 * Hands runs of one region to `writers` (one per lane, in lane order); resolves with the pages they sent, once all
 * went. The runs are cut into batches where they lie (a flat array: no per-run objects); over lanes each writer
 * gets its share and the lanes take turns, so that they all work at once.
 */
export async function writeRunBatches(writers: NativeBulkSend[], region: number, runs: Runs, o: BatchOptions): Promise<BatchResult> {
  const total = { data: 0, zero: 0 }
  const add = (r: BatchResult) => {
    total.data += r.data
    total.zero += r.zero
  }
  const flat = runs instanceof Uint32Array ? runs : flatten(runs)
  const shares = writers.length > 1 ? splitByLane(flat, writers.length).map((l) => Uint32Array.from(l)) : [flat]
  const queues = writers.map((writer, i) => ({ writer, runs: shares[i], next: 0, inFlight: [] as Promise<BatchResult>[] }))
  for (let more = true; more && !o.failed();) {
    more = false
    for (const q of queues) {
      if (q.next >= q.runs.length) continue
      const end = batchEnd(q.runs, q.next)
      q.inFlight.push(q.writer.pages(region, q.runs.subarray(q.next, end), o.framePages, o.takePending))
      q.next = end
      more ||= end < q.runs.length
      // yieldToLoop false (the pause window): nothing awaited here, every batch is queued in this turn
      if (o.yieldToLoop && q.inFlight.length >= WRITER_BATCHES_IN_FLIGHT) add(await q.inFlight.shift()!)
    }
  }
  for (const q of queues) for (const p of q.inFlight) add(await p)
  return total
}

/** Where the batch starting at run entry `from` ends: once it holds WRITER_BATCH_PAGES pages, or at the end. */
function batchEnd(runs: Uint32Array, from: number): number {
  let k = from, pages = 0
  while (k + 1 < runs.length && pages < WRITER_BATCH_PAGES) pages += runs[k + 1], (k += 2)
  return k
}

function flatten(pairs: Iterable<[number, number]>): Uint32Array {
  const out: number[] = []
  for (const [s, n] of pairs) out.push(s, n)
  return Uint32Array.from(out)
}

/** The pairs of a flat run array, one by one. */
export function* eachPair(runs: Uint32Array): Generator<[number, number]> {
  for (let k = 0; k + 1 < runs.length; k += 2) yield [runs[k], runs[k + 1]]
}
