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

/** Hands runs of one region to `writers` (one per lane, in lane order); resolves with the pages they sent, once all went. */
export async function writeRunBatches(writers: NativeBulkSend[], region: number, runs: Runs, o: BatchOptions): Promise<BatchResult> {
  const total = { data: 0, zero: 0 }
  const add = (r: BatchResult) => {
    total.data += r.data
    total.zero += r.zero
  }
  const queues = writers.map((writer) => ({ writer, inFlight: [] as Promise<BatchResult>[] }))
  const submit = (i: number, batch: Uint32Array): Promise<void> | undefined => {
    const q = queues[i]
    q.inFlight.push(q.writer.pages(region, batch, o.framePages, o.takePending))
    return o.yieldToLoop && q.inFlight.length >= WRITER_BATCHES_IN_FLIGHT ? q.inFlight.shift()!.then(add) : undefined
  }
  if (runs instanceof Uint32Array && writers.length === 1) {
    // as a scan returned them (round 0's present runs): cut into batches where they lie, no per-run objects
    let start = 0, pages = 0
    for (let k = 0; k + 1 < runs.length && !o.failed(); k += 2) {
      pages += runs[k + 1]
      if (pages < WRITER_BATCH_PAGES) continue
      const full = submit(0, runs.subarray(start, k + 2))
      start = k + 2
      pages = 0
      if (full) await full
    }
    const last = start < runs.length && !o.failed() ? submit(0, runs.subarray(start)) : undefined
    if (last) await last
  } else {
    const batches = queues.map(() => ({ runs: [] as number[], pages: 0 }))
    const pairs: Iterable<[number, number]> = runs instanceof Uint32Array ? eachPair(runs) : runs
    for (const [s, n] of pairs) {
      if (o.failed()) break
      const parts = queues.length > 1 ? splitByLane([s, n], queues.length) : [[s, n]]
      for (let i = 0; i < queues.length; i++) {
        const b = batches[i], part = parts[i]
        for (let k = 0; k < part.length; k += 2) b.runs.push(part[k], part[k + 1]), (b.pages += part[k + 1])
        if (b.pages < WRITER_BATCH_PAGES) continue
        const full = submit(i, Uint32Array.from(b.runs))
        b.runs = []
        b.pages = 0
        if (full) await full
      }
    }
    // every lane's last batch queued before anything is awaited (yieldToLoop false: all of it in this turn)
    const last = batches.map((b, i) => (b.runs.length ? submit(i, Uint32Array.from(b.runs)) : undefined))
    for (const full of last) if (full) await full
  }
  for (const q of queues) for (const p of q.inFlight) add(await p)
  return total
}

/** The pairs of a flat run array, one by one. */
export function* eachPair(runs: Uint32Array): Generator<[number, number]> {
  for (let k = 0; k + 1 < runs.length; k += 2) yield [runs[k], runs[k + 1]]
}
