// How runs reach the native writers (src/agent/source/writer-batches.ts):
// in order, cut into batches of bounded pages and entries, a flat scan
// result sliced where it lies, every lane its share, and in the pause window
// (yieldToLoop false) all of it queued before the call returns.
import { describe, expect, it } from 'vitest'
import type { BatchResult, NativeBulkSend } from '../../src/agent/source/bulk-writer'
import { laneOf } from '../../src/agent/source/lanes'
import { writeRunBatches } from '../../src/agent/source/writer-batches'

/** A writer that records its batches and answers each one later (data = its pages, zero = 0). */
function recorder() {
  const batches: { region: number; runs: number[]; framePages?: number; takePending: boolean }[] = []
  const answers: (() => void)[] = []
  const writer = {
    pages(region: number, runs: Uint32Array, framePages?: number, takePending = false): Promise<BatchResult> {
      batches.push({ region, runs: Array.from(runs), framePages, takePending })
      let pages = 0
      for (let k = 1; k < runs.length; k += 2) pages += runs[k]
      return new Promise((resolve) => answers.push(() => resolve({ data: pages, zero: 0 })))
    },
  }
  // answers every batch queued so far, now and as more come
  const answerAll = async (until: Promise<unknown>) => {
    let done = false
    void until.then(() => (done = true))
    while (!done) {
      answers.splice(0).forEach((a) => a())
      await new Promise((r) => setImmediate(r))
    }
  }
  return { writer: writer as unknown as NativeBulkSend, batches, answerAll, pendingAnswers: () => answers.length }
}

/** Runs of 7 pages with a one-page gap (the page-store's layout): flat. */
function sparseRuns(pages: number): Uint32Array {
  const out: number[] = []
  for (let p = 0; p + 7 <= pages; p += 8) out.push(p, 7)
  return Uint32Array.from(out)
}

const pagesOf = (runs: number[]) => runs.filter((_, i) => i % 2 === 1).reduce((a, b) => a + b, 0)
const opts = (yieldToLoop = true) => ({ framePages: 256, takePending: false, yieldToLoop, failed: () => false })

describe('runs handed to native writers', () => {
  it('a flat scan result goes in order, in batches of 2048 pages (the run that reaches it included)', async () => {
    const runs = sparseRuns(64 * 1024)
    const r = recorder()
    const sending = writeRunBatches([r.writer], 3, runs, opts())
    await r.answerAll(sending)
    const total = await sending
    expect(r.batches.flatMap((b) => b.runs)).toEqual(Array.from(runs))
    expect(r.batches.every((b) => b.region === 3 && b.framePages === 256 && !b.takePending)).toBe(true)
    expect(r.batches.slice(0, -1).map((b) => pagesOf(b.runs))).toEqual(r.batches.slice(0, -1).map(() => 2051)) // 293 runs of 7
    expect(total).toEqual({ data: 7 * (runs.length / 2), zero: 0 })
    // one-page runs: 2048 of them a batch
    const ones = Uint32Array.from(Array.from({ length: 20000 }, (_, k) => [2 * k, 1]).flat())
    const r1 = recorder()
    const s1 = writeRunBatches([r1.writer], 0, ones, opts())
    await r1.answerAll(s1)
    expect(r1.batches.map((b) => b.runs.length)).toEqual([...Array(9).fill(4096), 40000 - 9 * 4096])
  })

  it('pairs one by one give the same batches as the flat array', async () => {
    const runs = sparseRuns(40000)
    const a = recorder(), b = recorder()
    const pairs = function* () {
      for (let k = 0; k < runs.length; k += 2) yield [runs[k], runs[k + 1]] as [number, number]
    }
    const sa = writeRunBatches([a.writer], 0, runs, opts()), sb = writeRunBatches([b.writer], 0, pairs(), opts())
    await Promise.all([a.answerAll(sa), b.answerAll(sb)])
    expect(b.batches.map((x) => x.runs)).toEqual(a.batches.map((x) => x.runs))
  })

  it('keeps two batches in flight: the third waits for the first answer', async () => {
    const r = recorder()
    const sending = writeRunBatches([r.writer], 0, sparseRuns(16 * 1024), opts())
    await new Promise((res) => setImmediate(res))
    expect(r.batches).toHaveLength(2)
    await r.answerAll(sending)
    expect(r.batches.length).toBeGreaterThan(2)
  })

  it('in the pause window (yieldToLoop false) every batch is queued before the call returns', async () => {
    const r = recorder()
    const runs = sparseRuns(64 * 1024)
    const sending = writeRunBatches([r.writer], 0, runs, opts(false))
    // nothing answered yet, nothing awaited: all of it is with the writer already
    expect(r.batches.flatMap((b) => b.runs)).toEqual(Array.from(runs))
    await r.answerAll(sending)
    expect((await sending).data).toBe(7 * (runs.length / 2))
  })

  it('over lanes, each writer gets the pages of its own 2 MiB chunks, in order', async () => {
    const lanes = [recorder(), recorder(), recorder()]
    const runs = sparseRuns(8192)
    const sending = writeRunBatches(lanes.map((l) => l.writer), 1, runs, opts())
    await Promise.all(lanes.map((l) => l.answerAll(sending)))
    expect((await sending).data).toBe(7 * (runs.length / 2))
    lanes.forEach((l, i) => {
      const got = l.batches.flatMap((b) => b.runs)
      for (let k = 0; k < got.length; k += 2) expect(laneOf(got[k], 3)).toBe(i)
      for (let k = 2; k < got.length; k += 2) expect(got[k]).toBeGreaterThan(got[k - 2])
    })
    expect(lanes.reduce((n, l) => n + pagesOf(l.batches.flatMap((b) => b.runs)), 0)).toBe(7 * (runs.length / 2))
  })

  it('stops handing over once the channel failed', async () => {
    const r = recorder()
    let failed = false
    const sending = writeRunBatches([r.writer], 0, sparseRuns(64 * 1024), { ...opts(), failed: () => failed })
    await new Promise((res) => setImmediate(res))
    failed = true
    await r.answerAll(sending)
    expect(r.batches).toHaveLength(2)
  })
})
