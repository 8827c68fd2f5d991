/** Pure TypeScript tier: framing, message validation, bitmaps (no kernel needed). */
import { describe, expect, it } from 'vitest'
import { PageBitmap } from '../../src/bitmap'
import { FrameDecoder, type Frame } from '../../src/protocol/frames'
import { peerError } from '../../src/protocol/handshake'
import { decodeControl, decodePages, decodeRuns, encodeControl, encodeRuns, Msg, pagesHeader } from '../../src/protocol/messages'

const layout = [{ pageCount: 16 }, { pageCount: 4 }]

function decodeAll(bytes: Buffer, splits: number[]): Frame[] {
  const out: Frame[] = []
  const d = new FrameDecoder((f) => out.push({ type: f.type, payload: Buffer.from(f.payload) }), 1 << 20)
  let at = 0
  for (const s of [...splits, bytes.length]) {
    d.feed(bytes.subarray(at, s))
    at = s
  }
  return out
}

describe('framing', () => {
  const frames = Buffer.concat([
    ...encodeControl(Msg.ROUND_END, { round: 3 }),
    pagesHeader(1, 2, 1, 8), Buffer.alloc(8, 7),
    encodeRuns(Msg.RANGES, 0, 0, [1, 2, 9, 3]),
  ])

  it('decodes the same frames however the bytes are split', () => {
    const whole = decodeAll(frames, [])
    expect(whole.map((f) => f.type)).toEqual([Msg.ROUND_END, Msg.PAGES, Msg.RANGES])
    for (let cut = 1; cut < frames.length; cut++) {
      const split = decodeAll(frames, [cut, Math.min(frames.length, cut + 3)])
      expect(split.map((f) => [f.type, f.payload.toString('hex')])).toEqual(whole.map((f) => [f.type, f.payload.toString('hex')]))
    }
    expect(decodeControl(Msg.ROUND_END, whole[0].payload)).toEqual({ round: 3 })
  })

  it('gives back a partial frame as the bytes that came off the wire (a handed-over connection starts with them)', () => {
    for (let cut = 1; cut < frames.length; cut++) {
      const got: Frame[] = []
      const d = new FrameDecoder((f) => got.push(f), 1 << 20)
      d.feed(frames.subarray(0, cut))
      const consumed = got.reduce((n, f) => n + 5 + f.payload.length, 0)
      expect(d.drainRaw().toString('hex')).toBe(frames.subarray(consumed, cut).toString('hex'))
      expect(d.midFrame).toBe(false)
    }
  })

  it('rejects a frame longer than the limit before buffering it', () => {
    const d = new FrameDecoder(() => {}, 1024)
    const h = Buffer.alloc(5)
    h.writeUInt32BE(1026, 0)
    expect(() => d.feed(h)).toThrow(expect.objectContaining({ code: 'ERR_MIGRATION_PROTOCOL', message: expect.stringMatching(/got a length of 1026/) }))
    const zero = Buffer.alloc(4)
    expect(() => new FrameDecoder(() => {}, 1024).feed(zero)).toThrow(/length of 0/)
  })
})

describe('message validation', () => {
  const ps = 8
  const pages = (region: number, first: number, count: number, bytes: number) =>
    Buffer.concat([pagesHeader(region, first, count, ps), Buffer.alloc(bytes)]).subarray(5)

  it('accepts pages inside a region and rejects everything outside it', () => {
    expect(decodePages(pages(1, 3, 1, 8), layout, ps)).toMatchObject({ region: 1, firstPage: 3, pageCount: 1 })
    expect(() => decodePages(pages(2, 0, 1, 8), layout, ps)).toThrow(/region index below 2.*got 2/)
    expect(() => decodePages(pages(1, 4, 1, 8), layout, ps)).toThrow(/within \[0, 4\).*got 4\+1/)
    expect(() => decodePages(pages(1, 3, 2, 16), layout, ps)).toThrow(/got 3\+2/)
    expect(() => decodePages(pages(0, 0, 0, 0), layout, ps)).toThrow(/got 0\+0/)
    expect(() => decodePages(pages(0, 0, 2, 8), layout, ps)).toThrow(/expected 16 bytes of page data, got 8/)
    expect(() => decodePages(Buffer.alloc(5), layout, ps)).toThrow(/header of 12 bytes/)
  })

  it('validates run lists page by page', () => {
    const ok = encodeRuns(Msg.RANGES, 1, 0, [0, 16]).subarray(5)
    expect(Array.from(decodeRuns(Msg.RANGES, ok, layout).runs)).toEqual([0, 16])
    expect(() => decodeRuns(Msg.RANGES, encodeRuns(Msg.RANGES, 0, 0, [10, 7]).subarray(5), layout)).toThrow(/got 10\+7/)
    expect(() => decodeRuns(Msg.RANGES, Buffer.alloc(7), layout)).toThrow(/5 \+ 8k bytes, got 7/)
  })

  it('rejects control messages that are not msgpack maps', () => {
    expect(() => decodeControl(Msg.HANDOFF, Buffer.from([0x82, 0xa1, 0x61]))).toThrow(expect.objectContaining({ code: 'ERR_MIGRATION_PROTOCOL' }))
    expect(() => decodeControl(Msg.HANDOFF, Buffer.from([0x93, 1, 2, 3]))).toThrow(/to be a map/)
  })

  it('an ERROR is the peer\'s report only with its code: one without is a malformed frame of this side\'s finding (recovered after the hand-off)', () => {
    const body = (m: Record<string, unknown>) => Buffer.concat(encodeControl(Msg.ERROR, m)).subarray(5)
    expect(peerError(body({ code: 'ERR_MIGRATION_BUSY', message: 'busy', retryAfterMs: 500 }))).toMatchObject({ code: 'ERR_MIGRATION_BUSY', message: 'peer reported: busy', fromPeer: true, retryAfterMs: 500 })
    const bad = peerError(body({ message: 'no code' }))
    expect(bad).toMatchObject({ code: 'ERR_MIGRATION_PROTOCOL', message: 'expected ERROR.code to be a string, got undefined' })
    expect(bad.fromPeer).toBeUndefined()
  })
})

describe('page bitmap', () => {
  it('sets, clears and counts ranges across word boundaries', () => {
    const b = new PageBitmap(100)
    expect(b.setRange(30, 40)).toBe(40)
    expect(b.setRange(60, 20)).toBe(10)
    expect(b.count()).toBe(50)
    expect(b.clearRange(31, 2)).toBe(2)
    expect([...b.runs()]).toEqual([[30, 1], [33, 47]])
    expect(b.nextSet(0)).toBe(30)
    expect(b.nextClear(30)).toBe(31)
    expect(b.nextSet(80)).toBe(-1)
    expect(b.allSet(33, 47)).toBe(true)
    expect(b.allSet(32, 2)).toBe(false)
    expect(b.nextClear(33, 80)).toBe(-1)
  })

  it('takeRange clears a range and hands over exactly the runs that were set', () => {
    const b = new PageBitmap(100)
    b.setRange(3, 5)
    b.setRange(30, 40)
    b.setRange(90, 10)
    const runs: number[][] = []
    expect(b.takeRange(5, 90, (p, q) => runs.push([p, q]))).toBe(3 + 40 + 5)
    expect(runs).toEqual([[5, 8], [30, 70], [90, 95]])
    expect([...b.runs()]).toEqual([[3, 2], [95, 5]])
    expect(b.takeRange(5, 90, () => runs.push([-1]))).toBe(0) // taken once: nobody gets them again
  })

  it('agrees with a naive set on random operations', () => {
    let seed = 7
    const rnd = (n: number) => ((seed = (seed * 1103515245 + 12345) >>> 0) % n)
    const b = new PageBitmap(1000)
    const model = new Uint8Array(1000)
    for (let i = 0; i < 500; i++) {
      const s = rnd(1000), n = 1 + rnd(1000 - s)
      const set = rnd(2) === 0
      const changed = set ? b.setRange(s, n) : b.clearRange(s, n)
      let expected = 0
      for (let p = s; p < s + n; p++) {
        if (model[p] !== (set ? 1 : 0)) expected++
        model[p] = set ? 1 : 0
      }
      expect(changed).toBe(expected)
    }
    const runs: number[] = []
    for (const [s, n] of b.runs()) for (let p = s; p < s + n; p++) runs.push(p)
    expect(runs).toEqual([...model.keys()].filter((p) => model[p]))
  })

  it('walks the runs of equal bits of a range, in order, across word boundaries', () => {
    const b = new PageBitmap(100)
    b.setRange(3, 30) // 3..32 crosses a word
    b.set(64)
    const runs: [number, number, boolean][] = []
    b.eachRun(1, 70, (first, end, isSet) => runs.push([first, end, isSet]))
    expect(runs).toEqual([[1, 3, false], [3, 33, true], [33, 64, false], [64, 65, true], [65, 70, false]])
    const none: unknown[] = []
    b.eachRun(5, 5, (...r) => none.push(r))
    expect(none).toEqual([])
  })

  it('complements a map without setting bits past its end', () => {
    const held = new PageBitmap(70)
    held.setRange(0, 10)
    held.setRange(40, 5)
    const pending = PageBitmap.complementOf(held.words, 70)
    expect([...pending.runs()]).toEqual([[10, 30], [45, 25]])
    expect(pending.count()).toBe(55)
    expect(pending.words[2] >>> 6).toBe(0) // pages 70..95 of the last word stay clear
  })
})
