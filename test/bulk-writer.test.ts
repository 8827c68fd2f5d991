// The source's native bulk writer (native/bulk_writer.cc) on a real TCP
// connection: what it writes is decoded with the protocol's own decoder and
// compared with region memory and with the bitmaps it marks.
import { describe, expect, it } from 'vitest'
import { loadBinding } from '../src/binding'
import { PageBitmap } from '../src/bitmap'
import { type Frame, FrameDecoder } from '../src/protocol/frames'
import { decodeBatch, decodePages, decodeRuns, encodeControl, Msg, RangeKind } from '../src/protocol/messages'
import { Region } from '../src/region'
import { Opener, Sealer } from '../src/protocol/records'
import { randomBytes } from 'node:crypto'
import { socketFd } from '../src/socket-fd'
import { kernelSkipReason } from './helpers/gate'
import { tcpPair } from './helpers/tcp'
import { pollUntil } from './helpers/wait'

const skip = kernelSkipReason()

describe.skipIf(skip)('native bulk writer', () => {
  const b = skip ? (undefined as never) : loadBinding()
  const ps = skip ? 4096 : b.pageSize

  // sealed: an encrypted migration's bulk connection, the writer sealing what it writes (native/records.h), handed
  // over mid-stream (3 records sealed by JS already) with keys rotating every 64 KiB; the peer opens it with JS's
  // record layer
  for (const sealed of [false, true]) it(`writes frames and runs in call order${sealed ? ', sealed' : ''}: data pages from memory, zero pages as ranges, bitmaps marked, resends counted, pending taken once`, async () => {
    const pages = 1024
    const region = Region.create('w', pages * ps)
    const u8 = new Uint8Array(region.buffer)
    const isZero = (p: number) => p % 7 === 3 || (p >= 600 && p < 700)
    for (let p = 0; p < pages; p++) if (!isZero(p)) u8[p * ps + (p % ps)] = (p % 251) + 1
    const destHas = new PageBitmap(pages), everSent = new PageBitmap(pages), pending = new PageBitmap(pages)
    const { client, server, close } = await tcpPair()
    const frames: Frame[] = []
    const decoder = new FrameDecoder((f) => frames.push(f), 64 << 20)
    const KEY = { key: randomBytes(32), iv: randomBytes(12) }, REKEY = 64 << 10
    let warming = true // the records JS sealed before the hand-over: not frames for this test
    const opener = new Opener(KEY, (plain) => warming || decoder.feed(plain), 'bulk', REKEY)
    const warm = new Sealer(KEY, REKEY)
    for (const n of [98, 1, 1]) opener.feed(Buffer.concat(warm.seal([Buffer.alloc(n)])))
    warming = false
    const wire: Buffer[] = []
    server.on('data', (c: Buffer) => (sealed ? (wire.push(c), opener.feed(c)) : decoder.feed(c)))
    const events: number[] = []
    const seal = sealed ? { send: { ...KEY, seq: 3, bytesUnderKey: 100, rekeyBytes: REKEY } } : undefined
    const writer = new b.BulkWriter!(socketFd(client)!, [region.id], [destHas.words], [everSent.words], (ev) => events.push(...ev), seal)
    // written: the DONE event (kind 1) of batch `seq` reached JS (an IDLE seen earlier may be from before the last batch)
    const written = (seq: number) => new Promise<void>((resolve) => {
      const t = setInterval(() => {
        if (events.some((_, i) => i % 5 === 0 && events[i] === 1 && events[i + 1] === seq)) (clearInterval(t), resolve())
      }, 5)
    })
    const first = Buffer.concat(encodeControl(Msg.ROUND_END, { round: 0 }))
    writer.frame(first)
    writer.pages(0, Uint32Array.from([0, 300, 500, 300])) // [0,300) and [500,800), 1 MiB frames
    writer.frame(Buffer.concat(encodeControl(Msg.PRECOPY_END, { reason: 'converged' })))
    const resent = writer.pages(0, Uint32Array.from([10, 20]), 4) // sent again, frames of 4 pages
    await written(resent)
    // DONE (kind 1): (seq, data, zero, pages sent before) per batch
    const done = [] as number[][]
    for (let i = 0; i < events.length; i += 5) if (events[i] === 1) done.push(events.slice(i + 1, i + 5))
    const resendData = [...Array(20).keys()].filter((i) => !isZero(10 + i)).length
    expect(done.map((d) => d.slice(1))).toEqual([[428, 172, 0], [resendData, 20 - resendData, resendData]])
    // after the hand-off: only pages still pending go, each once, and leave the map
    pending.setRange(900, 100)
    pending.clearRange(950, 10)
    writer.setPending([pending.words])
    events.length = 0
    writer.pages(0, Uint32Array.from([880, 144]), 64, true)
    const taken = writer.pages(0, Uint32Array.from([900, 10]), 64, true) // already taken: nothing more goes
    await written(taken)
    await new Promise((r) => setTimeout(r, 50))
    const layout = [{ pageCount: pages }]

    // call order on the wire
    const kinds = frames.map((f) => f.type)
    expect(kinds[0]).toBe(Msg.ROUND_END)
    const end = kinds.indexOf(Msg.PRECOPY_END)
    expect(end).toBeGreaterThan(1)
    // every page of the first batch exactly once before PRECOPY_END: data as PAGES with its bytes, zero as ZERO ranges
    const seen = new Map<number, 'data' | 'zero'>()
    const bad: string[] = []
    const take = (slice: Frame[], into: Map<number, 'data' | 'zero'>) => {
      for (const f of slice) {
        if (f.type === Msg.PAGES) {
          const m = decodePages(f.payload, layout, ps)
          for (let i = 0; i < m.pageCount; i++) {
            const p = m.firstPage + i
            if (into.has(p)) bad.push(`page ${p} twice`)
            into.set(p, 'data')
            if (Buffer.compare(m.data.subarray(i * ps, (i + 1) * ps), Buffer.from(region.buffer, p * ps, ps)) !== 0) bad.push(`page ${p} bytes`)
          }
        } else if (f.type === Msg.RANGES) {
          const m = decodeRuns(f.type, f.payload, layout)
          expect(m.kind).toBe(RangeKind.ZERO)
          for (let k = 0; k < m.runs.length; k += 2) for (let p = m.runs[k]; p < m.runs[k] + m.runs[k + 1]; p++) {
            if (into.has(p)) bad.push(`page ${p} twice`)
            into.set(p, 'zero')
          }
        }
      }
    }
    take(frames.slice(1, end), seen)
    const expected = new Map<number, 'data' | 'zero'>()
    for (const [s, n] of [[0, 300], [500, 300]]) for (let p = s; p < s + n; p++) expected.set(p, isZero(p) ? 'zero' : 'data')
    expect(bad).toEqual([])
    expect([...seen.entries()].sort((x, y) => x[0] - y[0])).toEqual([...expected.entries()].sort((x, y) => x[0] - y[0]))
    // the resend: frames of at most 4 pages
    const again = frames.slice(end + 1).filter((f) => f.type === Msg.PAGES).map((f) => decodePages(f.payload, layout, ps))
    const resend = again.filter((m) => m.firstPage < 880)
    expect(resend.every((m) => m.pageCount <= 4)).toBe(true)
    expect(resend.reduce((n, m) => n + m.pageCount, 0)).toBe(resendData)
    // bitmaps: destHas holds every page sent (data or zero); everSent only data pages
    for (let p = 0; p < 800; p++) expect(destHas.has(p)).toBe(p < 300 || p >= 500)
    // after the hand-off: exactly the pending pages of [880, 1024), each once, and the map is empty
    const post = new Map<number, 'data' | 'zero'>()
    take(frames.slice(end + 1).filter((f) => f.type !== Msg.PAGES || decodePages(f.payload, layout, ps).firstPage >= 880), post)
    expect(bad).toEqual([])
    const wanted = [...Array(100).keys()].map((i) => 900 + i).filter((p) => p < 950 || p >= 960)
    expect([...post.keys()].filter((p) => p >= 880).sort((x, y) => x - y)).toEqual(wanted)
    expect(pending.count()).toBe(0)
    expect(everSent.count()).toBe(428 + wanted.filter((p) => !isZero(p)).length)
    // events: SENT (kind 2) for exactly the pending pages; DONE (kind 1) per batch with its counts
    let sent = 0
    for (let i = 0; i < events.length; i += 5) if (events[i] === 2) sent += events[i + 3]
    expect(sent).toBe(wanted.length)
    expect(writer.bytesWritten).toBeGreaterThan(500 * ps)
    // sealed: no page's bytes on the wire
    if (sealed) expect(Buffer.concat(wire).indexOf(Buffer.from(region.buffer, 1 * ps, 64))).toBe(-1)
    writer.close()
    close()
    region.release()
  })

  it('announces each gathered write of several frames with a BATCH of their exact bytes, once asked to', async () => {
    const pages = 1024
    const region = Region.create('w', pages * ps)
    const u8 = new Uint8Array(region.buffer)
    for (let p = 0; p < pages; p++) if (p % 8 !== 7) u8[p * ps] = (p % 251) + 1 // 7-page frames between zero pages
    const destHas = new PageBitmap(pages), everSent = new PageBitmap(pages)
    const { client, server, close } = await tcpPair()
    const frames: Frame[] = []
    const decoder = new FrameDecoder((f) => frames.push(f), 64 << 20)
    server.on('data', (c: Buffer) => decoder.feed(c))
    const writer = new b.BulkWriter!(socketFd(client)!, [region.id], [destHas.words], [everSent.words], () => {})
    const sent = (n: number) => new Promise<void>((resolve) => {
      const t = setInterval(() => frames.filter((f) => f.type === Msg.ROUND_END).length >= n && (clearInterval(t), resolve()), 5)
    })
    try {
      writer.pages(0, Uint32Array.from([0, 512])) // not asked yet: no BATCH
      writer.frame(Buffer.concat(encodeControl(Msg.ROUND_END, { round: 0 })))
      await sent(1)
      expect(frames.some((f) => f.type === Msg.BATCH)).toBe(false)
      frames.length = 0
      writer.announceBatches(true)
      writer.pages(0, Uint32Array.from([512, 512]))
      writer.frame(Buffer.concat(encodeControl(Msg.ROUND_END, { round: 1 })))
      await sent(1)
      const batches = frames.filter((f) => f.type === Msg.BATCH)
      expect(batches.length).toBeGreaterThan(0)
      // after each BATCH: whole PAGES frames (two or more) adding up to exactly the bytes it announced
      const layout = [{ pageCount: pages }]
      const pagesSeen = new Set<number>()
      for (let i = 0; i < frames.length; i++) {
        if (frames[i].type === Msg.PAGES) for (let k = 0, m = decodePages(frames[i].payload, layout, ps); k < m.pageCount; k++) pagesSeen.add(m.firstPage + k)
        if (frames[i].type !== Msg.BATCH) continue
        const want = decodeBatch(frames[i].payload)
        let got = 0, n = 0
        for (let j = i + 1; j < frames.length && got < want; j++, n++) {
          expect(frames[j].type).toBe(Msg.PAGES)
          got += 5 + frames[j].payload.length
        }
        expect(got).toBe(want)
        expect(n).toBeGreaterThan(1)
      }
      expect(pagesSeen.size).toBe(448) // every data page of [512, 1024) once
    } finally {
      writer.close()
      close()
      region.release()
    }
  })

  it('reports a write that fails (the peer closed) once, and keeps its calls harmless afterwards', async () => {
    const region = Region.create('w', 256 * ps)
    new Uint8Array(region.buffer).fill(1)
    const { client, server, close } = await tcpPair()
    server.destroy()
    const events: number[] = []
    const writer = new b.BulkWriter!(socketFd(client)!, [region.id], [new PageBitmap(256).words], [new PageBitmap(256).words], (ev) => events.push(...ev))
    for (let i = 0; i < 20; i++) writer.pages(0, Uint32Array.from([0, 256]))
    await pollUntil(() => events.some((_, i) => i % 5 === 0 && events[i] === 7), 2000, 10)
    const closedEvents = events.filter((_, i) => i % 5 === 0 && events[i] === 7).length
    expect(closedEvents).toBe(1)
    expect(() => writer.pages(0, Uint32Array.from([0, 1]))).not.toThrow()
    expect(() => writer.pages(5, Uint32Array.from([0, 1]))).toThrow(/no such region/)
    writer.close()
    expect(() => writer.frame(Buffer.from([0, 0, 0, 1, 7]))).toThrow(/closed/)
    close()
    region.release()
  })
})
