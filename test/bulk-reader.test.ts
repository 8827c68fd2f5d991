// The destination's native bulk reader (native/bulk.cc) on a real TCP
// connection and a real userfaultfd region: frames many to a read (a run of
// a few pages between zero pages), frames larger than its buffer (read
// straight into staging), control frames for JS in order, all of it written
// in pieces of random size so that every frame is cut somewhere; BATCH frames
// announcing the bytes of a gathered write; and a frame that breaks the rules
// stops it.
import { once } from 'node:events'
import type { Socket } from 'node:net'
import { describe, expect, it } from 'vitest'
import { DemandEv, eachDemandEvent } from '../src/agent/demand-events'
import { loadBinding } from '../src/binding'
import { PageBitmap } from '../src/bitmap'
import { decodeBatch, encodeBatch, encodeControl, encodeRuns, Msg, pagesHeader, RangeKind } from '../src/protocol/messages'
import { takeSocket } from '../src/socket-fd'
import { Sealer } from '../src/protocol/records'
import { randomBytes } from 'node:crypto'
import { prng } from '../src/testing/prng'
import { kernelSkipReason } from './helpers/gate'
import { tcpPair } from './helpers/tcp'
import { missingRegion } from './helpers/uffd-region'
import { pollUntil } from './helpers/wait'

const skip = kernelSkipReason()

/** The socket's descriptor and what Node had read of it, Node reading nothing more (as Channel.handOver()). */
const takenOf = new Map<Socket, { fd: number; head: Buffer }>()
function taken(s: Socket): { fd: number; head: Buffer } {
  if (!takenOf.has(s)) takenOf.set(s, takeSocket(s)!)
  return takenOf.get(s)!
}

describe.skipIf(skip)('native bulk reader', () => {
  const b = skip ? (undefined as never) : loadBinding()
  const ps = skip ? 4096 : b.pageSize

  /**
   * A sealed connection as JS hands it over mid-stream (5 records sealed already, keys rotating every 64 KiB): the
   * reader's seal, and wrap(frames), each frame sealed as the native writer seals one write (records of <= 256 KiB).
   */
  function sealing() {
    const KEY = { key: randomBytes(32), iv: randomBytes(12) }, REKEY = 64 << 10
    const sealer = new Sealer(KEY, REKEY)
    let under = 0
    for (const n of [1000, 1, 1, 1, 1]) (sealer.seal([Buffer.alloc(n)]), (under += n))
    const s = {
      native: { recv: { ...KEY, seq: 5, bytesUnderKey: under, rekeyBytes: REKEY }, cipherHead: new Uint8Array(0) },
      wireBytes: 0,
      wrap: (frames: Buffer[]) => {
        const wire = Buffer.concat(frames.map((f) => Buffer.concat(sealer.seal([f]))))
        s.wireBytes += wire.length
        return wire
      },
    }
    return s
  }

  function setup(pages: number) {
    const { region, uffd } = missingRegion(b, pages)
    const received = new PageBitmap(pages), knownZero = new PageBitmap(pages), freed = new PageBitmap(pages)
    return { region, uffd, received, knownZero, freed }
  }

  /** A PAGES frame of [first, first+count) whose page p holds `mark(p)` in every byte. */
  function pagesFrame(first: number, count: number, mark: (p: number) => number): Buffer {
    const body = Buffer.alloc(count * ps)
    for (let i = 0; i < count; i++) body.fill(mark(first + i), i * ps, (i + 1) * ps)
    return Buffer.concat([pagesHeader(0, first, count, ps), body])
  }

  async function feed(sock: Socket, stream: Buffer, seed: number): Promise<void> {
    const rand = prng(seed)
    for (let off = 0; off < stream.length;) {
      const n = Math.min(stream.length - off, 1 + Math.floor(rand() * 96 * 1024))
      if (!sock.write(stream.subarray(off, off + n))) await once(sock, 'drain')
      off += n
      if (rand() < 0.3) await new Promise((r) => setTimeout(r, 1))
    }
  }

  // sealed: an encrypted migration's bulk connection, the reader opening the records itself (native/records.h), each
  // frame written as the writer seals it (one or more records), cut into the same random pieces
  for (const [seed, sealed] of [[1, false], [2, false], [3, false], [4, true], [5, true]] as const) {
    it(`places small frames read many at a time, large frames read straight, zero ranges, and hands control frames to JS in order (pieces seed ${seed}${sealed ? ', sealed' : ''})`, async () => {
      const pages = 640
      const { region, uffd, received, knownZero, freed } = setup(pages)
      const { client, server, close } = await tcpPair()
      const frames: { type: number; payload: Buffer }[] = []
      let receivedCount = 0
      const onEvents = (ev: Float64Array, fs: Buffer[] = []) => eachDemandEvent(ev, (kind, a, bb) => {
        if (kind === DemandEv.FRAME) frames.push({ type: bb, payload: fs[a] })
        else if (kind === DemandEv.RECEIVED) receivedCount += a
      })
      const seal = sealed ? sealing() : undefined
      const reader = new b.BulkReader!(uffd.fd, [region.id], [received.words], [knownZero.words], [freed.words], taken(server).fd, taken(server).head, onEvents, false, seal?.native)
      try {
        // [0, 400): runs of 7 data pages and 1 zero page; a control frame between; [400, 640): two large frames
        // (100 and 140 pages, each larger than a small frame); then [0, 7) again with new data (pre-copy: overwritten in place)
        const parts: Buffer[] = []
        const zeroRuns: number[] = []
        for (let p = 0; p < 400; p += 64) {
          // as the native writer gathers them: eight 7-page frames after a BATCH with their bytes
          const group: Buffer[] = []
          for (let q = p; q < Math.min(400, p + 64); q += 8) {
            group.push(pagesFrame(q, 7, (r) => (r % 251) + 1))
            zeroRuns.push(q + 7, 1)
          }
          const bytes = Buffer.concat(group)
          parts.push(encodeBatch(bytes.length), bytes)
          if (p === 192) parts.push(...encodeControl(Msg.ROUND_END, { round: 0 }))
        }
        parts.push(encodeRuns(Msg.RANGES, RangeKind.ZERO, 0, zeroRuns))
        parts.push(pagesFrame(15, 1, () => 77)) // a known-zero page written in a later round: over its zero page
        // two large frames back to back (after a large one the reader reads only the next header ahead)
        parts.push(pagesFrame(400, 100, (q) => (q % 13) + 100), pagesFrame(500, 140, (q) => (q % 13) + 100))
        parts.push(pagesFrame(0, 7, (q) => 200 + q))
        // a control frame larger than the buffer: read straight, handed to JS whole
        const big = encodeControl(Msg.ROUND_END, { round: 1, pad: Buffer.alloc(400 << 10, 7) })
        parts.push(...big)
        await feed(client, seal ? seal.wrap(parts) : Buffer.concat(parts), seed)
        await pollUntil(() => frames.length >= 2, 10_000, 10)

        expect(frames.map((f) => f.type)).toEqual([Msg.ROUND_END, Msg.ROUND_END])
        expect(frames[1].payload.equals(big[1])).toBe(true)
        const mem = Buffer.from(region.buffer)
        const want = (p: number) => (p === 15 ? 77 : p < 7 ? 200 + p : p < 400 ? (p % 251) + 1 : (p % 13) + 100)
        const isZero = (p: number) => p < 400 && p % 8 === 7 && p !== 15
        const wrong: number[] = []
        // known zero: the zero page was installed as the range came (zeropage() finds it present), so that the
        // service's first touch after the hand-off is no userfault; it reads as zero
        const zeroPages = Array.from({ length: 50 }, (_, k) => k * 8 + 7).filter(isZero)
        expect(zeroPages.filter((p) => uffd.zeropage(region.id, p * ps, ps) !== 1)).toEqual([])
        for (let p = 0; p < pages; p++) {
          const expected = isZero(p) ? Buffer.alloc(ps) : Buffer.alloc(ps, want(p))
          if (!mem.subarray(p * ps, (p + 1) * ps).equals(expected)) wrong.push(p)
        }
        expect(wrong).toEqual([])
        for (let p = 0; p < pages; p++) {
          expect(received.has(p)).toBe(true)
          expect(knownZero.has(p)).toBe(isZero(p))
        }
        expect(receivedCount).toBe(pages)
        const plain = Buffer.concat(parts).length
        // sealed: the plaintext opened and the ciphertext read both count (the watchdog's progress)
        expect(reader.bytesRead + taken(server).head.length).toBe(seal ? plain + seal.wireBytes : plain)
      } finally {
        reader.close()
        close()
        uffd.close()
      }
    })
  }

  it('a pre-copy-only session (lazyZero) leaves known-zero pages missing, installs a later round\'s data over one with UFFDIO_COPY, and drops data that became zero', async () => {
    const pages = 64
    const { region, uffd, received, knownZero, freed } = setup(pages)
    const { client, server, close } = await tcpPair()
    let receivedCount = 0
    const frames: number[] = []
    const onEvents = (ev: Float64Array) => eachDemandEvent(ev, (kind, a, bb) => {
      if (kind === DemandEv.RECEIVED) receivedCount += a
      else if (kind === DemandEv.FRAME) frames.push(bb)
    })
    const reader = new b.BulkReader!(uffd.fd, [region.id], [received.words], [knownZero.words], [freed.words], taken(server).fd, taken(server).head, onEvents, true)
    try {
      // round 0: [0, 32) data, [32, 64) zero; round 1: 40 and 41 written (data over known-zero pages), 3 and 4 zero now
      const stream = Buffer.concat([
        pagesFrame(0, 32, (p) => p + 1), encodeRuns(Msg.RANGES, RangeKind.ZERO, 0, [32, 32]),
        pagesFrame(40, 2, (p) => p + 100), encodeRuns(Msg.RANGES, RangeKind.ZERO, 0, [3, 2]),
        ...encodeControl(Msg.ROUND_END, { round: 1 }),
      ])
      await feed(client, stream, 4)
      // a copy over a missing page must not be an ordinary write: nobody serves this region's faults, the reader would hang
      await pollUntil(() => frames.length >= 1, 10_000, 10)
      expect(frames).toEqual([Msg.ROUND_END])
      expect(receivedCount).toBe(pages)
      const zero = (p: number) => (p >= 32 && p !== 40 && p !== 41) || p === 3 || p === 4
      for (let p = 0; p < pages; p++) {
        expect(received.has(p)).toBe(true)
        expect(knownZero.has(p)).toBe(zero(p))
      }
      // every known-zero page is still missing (zeropage() installs it now: none was present), every other present
      const present = Array.from({ length: pages }, (_, p) => p).filter((p) => uffd.zeropage(region.id, p * ps, ps) === 1)
      expect(present).toEqual(Array.from({ length: pages }, (_, p) => p).filter((p) => !zero(p)))
      const mem = Buffer.from(region.buffer)
      const wrong = Array.from({ length: pages }, (_, p) => p).filter((p) => {
        const want = zero(p) ? Buffer.alloc(ps) : Buffer.alloc(ps, p >= 40 ? p + 100 : p + 1)
        return !mem.subarray(p * ps, (p + 1) * ps).equals(want)
      })
      expect(wrong).toEqual([])
    } finally {
      reader.close()
      close()
      uffd.close()
    }
  })

  for (const seed of [5, 6]) {
    it(`zero pages installed later than they are learnt are all in before the next control frame reaches JS, never over a page that was dropped or written since (pieces seed ${seed})`, async () => {
      const pages = 4096
      const { region, uffd, received, knownZero, freed } = setup(pages)
      const { client, server, close } = await tcpPair()
      const frames: number[] = []
      const onEvents = (ev: Float64Array) => eachDemandEvent(ev, (kind, _a, bb) => {
        if (kind === DemandEv.FRAME) frames.push(bb)
      })
      const reader = new b.BulkReader!(uffd.fd, [region.id], [received.words], [knownZero.words], [freed.words], taken(server).fd, taken(server).head, onEvents)
      try {
        // round 0: [0, 8) data, the rest zero in one-page runs and one long run; round 1: 10 and 11 stale (dropped
        // there, fetched after the hand-off), 12 written, 3000 written; then a control frame
        const zeroRuns: number[] = []
        for (let p = 8; p < 2048; p++) zeroRuns.push(p, 1)
        zeroRuns.push(2048, pages - 2048)
        const stream = Buffer.concat([
          pagesFrame(0, 8, (p) => p + 1), encodeRuns(Msg.RANGES, RangeKind.ZERO, 0, zeroRuns),
          encodeRuns(Msg.RANGES, RangeKind.STALE, 0, [10, 2]), pagesFrame(12, 1, () => 99), pagesFrame(3000, 1, () => 98),
          ...encodeControl(Msg.ROUND_END, { round: 1 }),
        ])
        await feed(client, stream, seed)
        await pollUntil(() => frames.length >= 1, 10_000, 10)
        expect(frames).toEqual([Msg.ROUND_END])
        const stale = (p: number) => p === 10 || p === 11
        for (let p = 0; p < pages; p++) expect(received.has(p)).toBe(!stale(p))
        // present (zeropage() finds each in place) except the two dropped ones, still missing
        const missing = Array.from({ length: pages }, (_, p) => p).filter((p) => uffd.zeropage(region.id, p * ps, ps) === 0)
        expect(missing).toEqual([10, 11])
        const mem = Buffer.from(region.buffer)
        const want = (p: number) => (p < 8 ? p + 1 : p === 12 ? 99 : p === 3000 ? 98 : 0)
        const wrong = Array.from({ length: pages }, (_, p) => p).filter((p) => !stale(p) && !mem.subarray(p * ps, (p + 1) * ps).equals(Buffer.alloc(ps, want(p))))
        expect(wrong).toEqual([])
      } finally {
        reader.close()
        close()
        uffd.close()
      }
    })
  }

  /** A reader on a fresh region and connection; `body` gets them and what the reader reported; all closed after. */
  async function withReader(pages: number, body: (t: {
    client: Socket
    reader: { readonly bytesRead: number }
    mem: Buffer
    received: PageBitmap
    seen: { received: number; frames: { type: number; payload: Buffer }[] }
    /** The bytes to write for these frames (sealed: as records). */
    wrap(frames: Buffer[]): Buffer
  }) => Promise<void>, sealed = false, onMore?: (ev: Float64Array) => void): Promise<void> {
    const { region, uffd, received, knownZero, freed } = setup(pages)
    const { client, server, close } = await tcpPair()
    const seen = { received: 0, frames: [] as { type: number; payload: Buffer }[] }
    const onEvents = (ev: Float64Array, fs: Buffer[] = []) => (onMore?.(ev), eachDemandEvent(ev, (kind, a, bb) => {
      if (kind === DemandEv.RECEIVED) seen.received += a
      else if (kind === DemandEv.FRAME) seen.frames.push({ type: bb, payload: fs[a] })
    }))
    const seal = sealed ? sealing() : undefined
    const reader = new b.BulkReader!(uffd.fd, [region.id], [received.words], [knownZero.words], [freed.words], taken(server).fd, taken(server).head, onEvents, false, seal?.native)
    try {
      await body({ client, reader, mem: Buffer.from(region.buffer), received, seen, wrap: seal ? seal.wrap : (frames) => Buffer.concat(frames) })
    } finally {
      reader.close()
      close()
      uffd.close()
    }
  }

  /** Writes `stream` in 32 pieces, 20 ms apart (each leaves at once: no Nagle); the reader's bytesRead after each. */
  async function trickle(client: Socket, stream: Buffer, reader: { readonly bytesRead: number }): Promise<number[]> {
    client.setNoDelay(true)
    const piece = Math.ceil(stream.length / 32)
    const progress: number[] = []
    for (let off = 0; off < stream.length; off += piece) {
      client.write(stream.subarray(off, Math.min(off + piece, stream.length)))
      await new Promise((r) => setTimeout(r, 20))
      progress.push(reader.bytesRead)
    }
    return progress
  }

  for (const sealed of [false, true]) it(`a large frame that trickles in is placed whole, and its bytes count as progress while they gather (the low-water mark holds them in the socket${sealed ? '; sealed: a record begun holds its rest there too' : ''})`, async () => {
    const pages = 256
    await withReader(pages, async ({ client, reader, mem, seen, wrap }) => {
      const frames = [pagesFrame(0, pages, (q) => (q % 199) + 1), pagesFrame(0, 1, () => 250)]
      // the reader waits for the rest of the first frame; the progress must move meanwhile
      const progress = await trickle(client, wrap(frames), reader)
      await pollUntil(() => seen.received >= pages, 5000)
      expect(seen.received).toBe(pages)
      const partway = progress.slice(0, 16)
      expect(new Set(partway).size).toBe(16) // every piece showed up as progress, before the frame was whole
      if (!sealed) expect(Math.max(...partway)).toBeLessThan(frames[0].length)
      expect(mem.subarray(0, ps).equals(Buffer.alloc(ps, 250))).toBe(true) // the 1-page frame after it, in order
      const wrong = [...Array(pages).keys()].filter((p) => p > 0 && !mem.subarray(p * ps, (p + 1) * ps).equals(Buffer.alloc(ps, (p % 199) + 1)))
      expect(wrong).toEqual([])
    }, sealed)
  })

  for (const sealed of [false, true]) it(`a BATCH of small frames that trickles in is placed whole, and its bytes count as progress while they gather${sealed ? ' (sealed)' : ''}`, async () => {
    await withReader(320, async ({ client, reader, mem, seen, wrap }) => {
      // 40 frames of 7 pages (~1.1 MiB) announced by one BATCH, then a 1-page frame outside it
      const group: Buffer[] = []
      for (let p = 0; p < 320; p += 8) group.push(pagesFrame(p, 7, (q) => (q % 199) + 1))
      const batch = Buffer.concat(group)
      // (sealed: the BATCH and its frames are one write, as the writer gathers them)
      const progress = await trickle(client, wrap([Buffer.concat([encodeBatch(batch.length), batch]), pagesFrame(7, 1, () => 250)]), reader)
      await pollUntil(() => seen.received >= 281, 5000)
      expect(seen.received).toBe(281) // 40 x 7 pages and page 7
      expect(seen.frames).toEqual([]) // BATCH stays in the reader
      expect(new Set(progress.slice(0, 16)).size).toBe(16) // every piece showed up as progress
      const wrong = [...Array(320).keys()].filter((p) => (p % 8 !== 7 || p === 7) && !mem.subarray(p * ps, (p + 1) * ps).equals(Buffer.alloc(ps, p === 7 ? 250 : (p % 199) + 1)))
      expect(wrong).toEqual([])
    }, sealed)
  })

  // LinkEnd: 3 a failed tag, 2 not a record
  for (const [what, how] of [['a changed byte', 3], ['a plaintext frame', 2]] as const) {
    it(`sealed: ${what} stops it there: the records before it are placed, nothing of it or after it, JS hears why (LinkEnd ${how})`, async () => {
      const events: number[][] = []
      await withReader(64, async ({ client, received, wrap }) => {
        const first = wrap([pagesFrame(0, 4, () => 1)])
        let second = wrap([pagesFrame(8, 4, () => 2)])
        if (how === 3) second[200] ^= 1 // inside the second record's ciphertext
        else second = pagesFrame(8, 4, () => 2)
        client.write(Buffer.concat([first, second, wrap([pagesFrame(16, 4, () => 3)])]))
        await pollUntil(() => events.length > 0, 5000)
        await new Promise((r) => setTimeout(r, 100))
        expect([...Array(64).keys()].filter((p) => received.has(p))).toEqual([0, 1, 2, 3])
      }, true, (ev) => eachDemandEvent(ev, (kind, a, bb) => void (kind === DemandEv.CLOSED && events.push([a, bb]))))
      expect(events).toEqual([[74, how]]) // EBADMSG
    })
  }

  it('a BATCH that announces more than ever comes holds nothing up for long: the frame after it is placed', async () => {
    await withReader(16, async ({ client, mem, seen }) => {
      client.setNoDelay(true)
      client.write(Buffer.concat([encodeBatch(1 << 20), pagesFrame(0, 3, () => 5)])) // 1 MiB promised, 12 KiB sent
      await pollUntil(() => seen.received >= 3, 1000)
      expect(seen.received).toBe(3) // within a second, not at the link timeout
      expect(mem.subarray(0, 3 * ps).equals(Buffer.alloc(3 * ps, 5))).toBe(true)
    })
  })

  it('a BATCH of the wrong size stops it: the frame goes to JS, nothing after it is placed', async () => {
    await withReader(16, async ({ client, received, seen }) => {
      const bad = Buffer.from([0, 0, 0, 3, Msg.BATCH, 1, 2])
      await feed(client, Buffer.concat([pagesFrame(0, 4, () => 1), bad, pagesFrame(8, 4, () => 2)]), 9)
      await pollUntil(() => seen.frames.length >= 1, 5000)
      await new Promise((r) => setTimeout(r, 50))
      expect(seen.frames.map((f) => f.type)).toEqual([Msg.BATCH])
      expect(() => decodeBatch(seen.frames[0].payload)).toThrow(/BATCH of 4 bytes/)
      expect([...Array(16).keys()].filter((p) => received.has(p))).toEqual([0, 1, 2, 3])
    })
  })

  it('a PAGES frame for a region it does not have stops it: the frame goes to JS, nothing after it is placed', async () => {
    await withReader(64, async ({ client, received, seen }) => {
      const bad = pagesFrame(0, 2, () => 9)
      bad.writeUInt32LE(5, 5) // region 5
      await feed(client, Buffer.concat([pagesFrame(0, 4, () => 1), bad, pagesFrame(8, 4, () => 2)]), 7)
      await pollUntil(() => seen.frames.length >= 1, 5000)
      await new Promise((r) => setTimeout(r, 50))
      expect(seen.frames.map((f) => f.type)).toEqual([Msg.PAGES])
      expect(seen.frames[0].payload.readUInt32LE(0)).toBe(5) // its header (region, first, count): the message table names it
      expect([...Array(16).keys()].filter((p) => received.has(p))).toEqual([0, 1, 2, 3])
    })
  })

  // A source keeps each page on one stream (its lane); one that sends a page on two, one stream writing it over in
  // place while the other drops it (STALE), made the writing thread's copy fault on a missing page. Nobody answers a
  // fault before the hand-off: the thread waited in the kernel, and the hand-off, which joins the streams' threads,
  // wedged the agent. Here a reader of the uffd counts such faults and zero-fills them (so that a regression fails
  // the assertion instead of hanging the test).
  it('two readers of one region (bulk and an extra stream) never make each other fault: a drop waits for a write in place', async () => {
    const pages = 256
    const { region, uffd, received, knownZero, freed } = setup(pages)
    const faults: number[] = []
    uffd.startFaults((ev) => {
      for (let i = 0; i < ev.length; i += 3) {
        faults.push(ev[i + 1])
        uffd.zeropage(region.id, ev[i + 1] * ps, ps)
      }
    })
    const pairs = [await tcpPair(), await tcpPair()]
    const frames = [0, 0]
    const readers = pairs.map((pair, i) => new b.BulkReader!(uffd.fd, [region.id], [received.words], [knownZero.words], [freed.words], taken(pair.server).fd,
      taken(pair.server).head, (ev: Float64Array) => eachDemandEvent(ev, (kind) => void (kind === DemandEv.FRAME && frames[i]++)), false))
    try {
      await feed(pairs[0].client, pagesFrame(0, pages, () => 1), 1)
      const write = (sock: Socket, b: Buffer) => (sock.write(b) ? Promise.resolve() : once(sock, 'drain'))
      for (let round = 0; round < 50; round++) {
        const dropping: Buffer[] = [], writing: Buffer[] = []
        for (let i = 0; i < 20; i++) {
          dropping.push(encodeRuns(Msg.RANGES, RangeKind.STALE, 0, [0, pages]), pagesFrame(0, pages, () => 2))
          writing.push(pagesFrame(0, pages, () => 3))
        }
        await Promise.all([write(pairs[0].client, Buffer.concat(dropping)), write(pairs[1].client, Buffer.concat(writing))])
      }
      // a control frame on each: handed to JS once everything before it was placed
      for (const pair of pairs) pair.client.write(Buffer.concat(encodeControl(Msg.ROUND_END, { round: 1 })))
      expect(await pollUntil(() => frames[0] === 1 && frames[1] === 1, 30_000)).toBe(true)
      expect(faults).toEqual([])
      expect(received.count()).toBe(pages)
    } finally {
      for (const r of readers) r.close()
      uffd.close()
      region.release()
      for (const pair of pairs) pair.close()
    }
  })
})
