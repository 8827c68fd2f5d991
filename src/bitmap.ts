/**
 * One bit per page. Backed by an ArrayBuffer or a SharedArrayBuffer (the
 * destination's received map is read by the service's thread for isLocal()).
 * Iteration helpers skip whole zero/full words so that walking a sparse map
 * costs O(words skipped + bits returned). Range updates are atomic per
 * word: a native thread of the demand path sets and clears bits of the same
 * maps (received on the destination, pending on the source).
 */
export class PageBitmap {
  readonly words: Uint32Array

  constructor(
    readonly size: number,
    buffer?: ArrayBuffer | SharedArrayBuffer,
  ) {
    const nwords = Math.ceil(size / 32)
    this.words = buffer ? new Uint32Array(buffer, 0, nwords) : new Uint32Array(nwords)
  }

  static shared(size: number): PageBitmap {
    return new PageBitmap(size, new SharedArrayBuffer(Math.ceil(size / 32) * 4))
  }

  get buffer(): ArrayBuffer | SharedArrayBuffer {
    return this.words.buffer
  }

  has(i: number): boolean {
    return (this.words[i >>> 5] & (1 << (i & 31))) !== 0
  }

  set(i: number): void {
    this.words[i >>> 5] |= 1 << (i & 31)
  }

  clear(i: number): void {
    this.words[i >>> 5] &= ~(1 << (i & 31))
  }

  /** Sets [start, start+count); returns how many bits were newly set. */
  setRange(start: number, count: number): number {
    return this.applyRange(start, count, true)
  }

  /** Clears [start, start+count); returns how many bits were set before. */
  clearRange(start: number, count: number): number {
    return this.applyRange(start, count, false)
  }

  private applyRange(start: number, count: number, value: boolean): number {
    let changed = 0
    let i = start
    const end = start + count
    while (i < end) {
      const w = i >>> 5
      const bit = i & 31
      const n = Math.min(32 - bit, end - i)
      const mask = n === 32 ? 0xffffffff : ((1 << n) - 1) << bit
      if (value) changed += popcount(~Atomics.or(this.words, w, mask) & mask)
      else changed += popcount(Atomics.and(this.words, w, ~mask) & mask)
      i += n
    }
    return changed
  }

  /**
   * Clears [start, start+count) and calls fn(p, q) for each run of bits that
   * were set: whoever clears a bit first owns it (the source's push and its
   * native demand thread both take pages from the pending map).
   */
  takeRange(start: number, count: number, fn: (p: number, q: number) => void): number {
    let taken = 0, run = -1
    const end = start + count
    for (let i = start; i < end;) {
      const w = i >>> 5, bit = i & 31, n = Math.min(32 - bit, end - i)
      const mask = n === 32 ? 0xffffffff : ((1 << n) - 1) << bit
      const old = Atomics.and(this.words, w, ~mask) & mask
      if (old === 0) {
        if (run >= 0) fn(run, i), (run = -1)
      } else {
        for (let b = bit; b < bit + n; b++) {
          const had = (old & (1 << b)) !== 0
          if (had) taken++
          if (had && run < 0) run = (w << 5) + b
          else if (!had && run >= 0) fn(run, (w << 5) + b), (run = -1)
        }
      }
      i += n
    }
    if (run >= 0) fn(run, end)
    return taken
  }

  /** True when every bit of [start, start+count) is set. */
  allSet(start: number, count: number): boolean {
    return this.nextClear(start, start + count) === -1
  }

  count(): number {
    let c = 0
    for (let w = 0; w < this.words.length; w++) c += popcount(this.words[w])
    return c
  }

  /** First set bit in [from, end), or -1. */
  nextSet(from: number, end = this.size): number {
    return this.scan(from, end, 0)
  }

  /** First clear bit in [from, end), or -1. */
  nextClear(from: number, end = this.size): number {
    return this.scan(from, end, 0xffffffff)
  }

  private scan(from: number, end: number, skipWord: number): number {
    if (from >= end) return -1
    let w = from >>> 5
    let word = (this.words[w] ^ skipWord) & (0xffffffff << (from & 31))
    const lastWord = (end - 1) >>> 5
    for (;;) {
      if (word !== 0) {
        const i = (w << 5) + (31 - Math.clz32(word & -word))
        return i < end ? i : -1
      }
      if (++w > lastWord) return -1
      word = this.words[w] ^ skipWord
    }
  }

  /** Runs of set bits as [start, count] pairs, at most maxRuns of them from `from`. */
  *runs(from = 0, end = this.size): Generator<[number, number]> {
    let i = this.nextSet(from, end)
    while (i !== -1) {
      let j = this.nextClear(i, end)
      if (j === -1) j = end
      yield [i, j - i]
      i = this.nextSet(j, end)
    }
  }

  /** onRun(first, end, isSet) for each maximal run of equal bits in [from, end), in order. */
  eachRun(from: number, end: number, onRun: (first: number, end: number, isSet: boolean) => void): void {
    for (let p = from; p < end; ) {
      const isSet = this.has(p)
      let q = isSet ? this.nextClear(p, end) : this.nextSet(p, end)
      if (q === -1) q = end
      onRun(p, q, isSet)
      p = q
    }
  }

  /** Sets every page of a run list ([start, count] pairs). Returns bits newly set. */
  setRuns(runs: ArrayLike<number>): number {
    let n = 0
    for (let k = 0; k < runs.length; k += 2) n += this.setRange(runs[k], runs[k + 1])
    return n
  }

  copyFrom(other: PageBitmap): void {
    this.words.set(other.words)
  }

  /** The pages of [0, size) whose bit is clear in `words` (e.g. pending = not held by the destination). */
  static complementOf(words: ArrayLike<number>, size: number): PageBitmap {
    const m = new PageBitmap(size)
    for (let w = 0; w < m.words.length; w++) m.words[w] = ~words[w]
    const tail = size & 31
    if (tail) m.words[m.words.length - 1] &= (1 << tail) - 1 // no bits past the end
    return m
  }
}

export function popcount(x: number): number {
  x = x - ((x >>> 1) & 0x55555555)
  x = (x & 0x33333333) + ((x >>> 2) & 0x33333333)
  return (((x + (x >>> 4)) & 0x0f0f0f0f) * 0x01010101) >>> 24
}
