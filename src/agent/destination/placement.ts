/**
 * Where arriving pages go, and the only writer of the received map (which
 * the service's thread reads for isLocal()). Before the hand-off pages go
 * straight into the regions (UFFDIO_COPY for a missing page, a plain copy
 * over an older round's data); at the hand-off the discard list drops stale
 * copies; after it every page is installed with UFFDIO_COPY / ZEROPAGE and
 * reported to onArrived (wakes, latency, settled).
 */
import type { NativeUffd } from '../../binding'
import { PageBitmap } from '../../bitmap'
import { ErrorCode, migrationError } from '../../errors'
import { type PagesMsg, RangeKind, type RegionLayout, type RunsMsg } from '../../protocol/messages'
import type { Region } from '../../region'

export class Placement {
  private receivedCount = 0
  readonly totalPages: number
  /** Pages announced as zero/free (placed locally, never requested). */
  readonly knownZero: PageBitmap[]
  /** Freed by the service during post-copy and zero-filled here. */
  readonly freedHere: PageBitmap[]
  pagesReceivedTwice = 0
  /**
   * A pre-copy-only session (REGIONS.mode): every page is here at the
   * hand-off and the regions are unregistered once the service runs, after
   * which a missing page is plain anonymous memory that reads as zero; so
   * known-zero pages are not installed before the hand-off (one ioctl per
   * gap saved). Otherwise they are, as they are learnt: left missing, each
   * would cost the service a blocking fault after the hand-off.
   */
  private lazy = false
  private uffd: NativeUffd | undefined

  constructor(
    private readonly regions: Region[],
    /** Shared with the service's thread: isLocal() reads it. */
    readonly received: PageBitmap[],
    private readonly ps: number,
    /** Post-copy: pages placed (wake waits, time faults, check settled). */
    private readonly onArrived: (region: number, first: number, count: number) => void,
  ) {
    this.totalPages = regions.reduce((n, r) => n + r.pageCount, 0)
    this.receivedCount = received.reduce((n, m) => n + m.count(), 0) // an agent that took over: the crashed one's maps
    this.knownZero = regions.map((r) => new PageBitmap(r.pageCount))
    this.freedHere = regions.map((r) => new PageBitmap(r.pageCount))
  }

  get layout(): RegionLayout[] {
    return this.regions.map((r) => ({ pageCount: r.pageCount }))
  }

  /** Pages not here yet (neither received, zero-filled nor known zero). */
  get pagesLeft(): number {
    return this.totalPages - this.receivedCount
  }

  get complete(): boolean {
    return this.receivedCount >= this.totalPages
  }

  /** Known-zero pages are left missing before the hand-off (the native bulk reader follows the same rule). */
  get lazyZero(): boolean {
    return this.lazy
  }

  /** A session's uffd (undefined: it ended), and whether zero pages go in lazily (lazyZero). */
  attach(uffd: NativeUffd | undefined, lazyZero = false): void {
    this.uffd = uffd
    this.lazy = lazyZero
  }

  private markReceived(region: number, first: number, count: number): void {
    this.receivedCount += this.received[region].setRange(first, count)
  }

  /**
   * After the hand-off, the one rule for a page that arrives again: a page
   * already held here (data, known-zero or freed) is ignored and counted in
   * pagesReceivedTwice; only missing pages are installed. A known-zero page
   * has no page-table entry yet, so UFFDIO_COPY would otherwise put stale
   * data over it; and the rule makes the order of arrival irrelevant (a run
   * that completes the migration half-way through a frame leaves the rest
   * of the frame with nothing to do).
   */
  private eachMissing(region: number, first: number, count: number, fn: (p: number, q: number) => void): void {
    this.received[region].eachRun(first, first + count, (p, q, got) => {
      if (!got) return fn(p, q)
      // a page freed here while the source had it in flight is not a resend
      for (let k = p; k < q; k++) if (!this.freedHere[region].has(k)) this.pagesReceivedTwice++
    })
  }

  pages(m: PagesMsg, postcopy: boolean): void {
    const r = this.regions[m.region]
    if (postcopy) {
      this.eachMissing(m.region, m.firstPage, m.pageCount, (p, q) => {
        this.uffd!.copy(r.id, p * this.ps, m.data.subarray((p - m.firstPage) * this.ps, (q - m.firstPage) * this.ps))
        this.arrived(m.region, p, q - p)
      })
      return
    }
    // A page that holds data already (an older round's, or the zero page of
    // a known-zero one) is overwritten in place; a missing one is installed
    // with UFFDIO_COPY: one copy, no zero-fill fault, and never touched by
    // this thread while missing.
    const place = (p: number, q: number, missing: boolean) => {
      const bytes = m.data.subarray((p - m.firstPage) * this.ps, (q - m.firstPage) * this.ps)
      if (missing) this.uffd!.copy(r.id, p * this.ps, bytes)
      else new Uint8Array(r.buffer, p * this.ps, bytes.length).set(bytes)
    }
    this.received[m.region].eachRun(m.firstPage, m.firstPage + m.pageCount, (p, q, got) => {
      if (!got) place(p, q, true)
      else if (!this.lazy) place(p, q, false)
      else this.knownZero[m.region].eachRun(p, q, (a, b, zero) => place(a, b, zero)) // a lazy known-zero page is missing
    })
    this.knownZero[m.region].clearRange(m.firstPage, m.pageCount)
    this.markReceived(m.region, m.firstPage, m.pageCount)
  }

  /** RANGES: zero and free pages read as zero; before the hand-off, stale pages are dropped (they are sent again). */
  ranges(m: RunsMsg, postcopy: boolean): void {
    if (m.kind === RangeKind.STALE && !postcopy) return this.drop(m.region, m.runs)
    if (m.kind !== RangeKind.ZERO && m.kind !== RangeKind.FREE) throw migrationError(ErrorCode.PROTOCOL, `expected range kind zero or free${postcopy ? '' : ' or stale'}, got ${m.kind}`)
    this.zeroRuns(m.region, m.runs, postcopy)
  }

  /** Zero and free ranges alike: pages without payload that read as zero. */
  private zeroRuns(region: number, runs: Uint32Array, postcopy: boolean): void {
    const r = this.regions[region]
    for (let k = 0; k < runs.length; k += 2) {
      const first = runs[k], count = runs[k + 1]
      if (!postcopy) {
        // A page that held data from an earlier round is zero now.
        if (this.received[region].nextSet(first, first + count) !== -1) r.discard(first * this.ps, count * this.ps)
        // the zero page now (missing, it would cost the service a blocking fault after the hand-off), unless lazily
        if (!this.lazy) this.uffd!.zeropage(r.id, first * this.ps, count * this.ps)
        this.knownZero[region].setRange(first, count)
        this.markReceived(region, first, count)
      } else {
        this.eachMissing(region, first, count, (p, q) => {
          this.uffd!.zeropage(r.id, p * this.ps, (q - p) * this.ps)
          this.knownZero[region].setRange(p, q - p)
          this.arrived(region, p, q - p)
        })
      }
    }
  }

  /** The service freed these missing pages during post-copy: zero-filled here, unless its thread `filled` them already. */
  freeLocally(region: number, first: number, count: number, filled = false): void {
    if (!filled) this.uffd!.zeropage(this.regions[region].id, first * this.ps, count * this.ps)
    this.freedHere[region].setRange(first, count)
    this.arrived(region, first, count)
  }

  /** The native bulk reader placed or dropped pages before the hand-off: the received count changes by delta. */
  receivedNatively(delta: number): void {
    this.receivedCount += delta
  }

  /** The native demand thread installed these pages and marked `newly` of them received. */
  arrivedNatively(region: number, first: number, count: number, newly: number): void {
    this.receivedCount += newly
    this.onArrived(region, first, count)
  }

  private arrived(region: number, first: number, count: number): void {
    this.markReceived(region, first, count)
    this.onArrived(region, first, count)
  }

  /**
   * HANDOFF's discard lists (little-endian u32 (first, count) pairs per
   * region): pages the destination holds an old copy of are dropped so that
   * they fault and are fetched fresh. Validated before anything is dropped.
   */
  applyDiscard(discard: unknown[]): void {
    if (discard.length !== this.regions.length) {
      throw migrationError(ErrorCode.PROTOCOL, `expected HANDOFF.discard for ${this.regions.length} regions, got ${discard.length}`)
    }
    const lists = discard.map((d, i) => {
      if (!(d instanceof Uint8Array) || d.length % 8 !== 0) throw migrationError(ErrorCode.PROTOCOL, `expected HANDOFF.discard[${i}] to be 8k bytes`)
      // copied: msgpackr may hand out a view of a shared pool
      const runs = new Uint32Array(d.buffer.slice(d.byteOffset, d.byteOffset + d.byteLength))
      const pages = this.regions[i].pageCount
      for (let k = 0; k < runs.length; k += 2) {
        const first = runs[k], count = runs[k + 1]
        if (count === 0 || first >= pages || count > pages - first) {
          throw migrationError(ErrorCode.PROTOCOL, `expected discard runs inside region ${i}, got ${first}+${count}`)
        }
      }
      return runs
    })
    lists.forEach((runs, i) => this.drop(i, runs))
  }

  /**
   * Drops these (validated) runs: they read as missing again and fault when touched after the hand-off. The
   * memory goes in one system call for all of them (the discard list is applied in the pause window).
   */
  drop(region: number, runs: Uint32Array): void {
    const held: number[] = []
    for (let k = 0; k < runs.length; k += 2) {
      const first = runs[k], count = runs[k + 1]
      if (this.received[region].nextSet(first, first + count) !== -1) held.push(first, count)
    }
    this.regions[region].discardRuns(Uint32Array.from(held))
    for (let k = 0; k < runs.length; k += 2) {
      this.receivedCount -= this.received[region].clearRange(runs[k], runs[k + 1])
      this.knownZero[region].clearRange(runs[k], runs[k + 1])
    }
  }

  /** The session ended before the hand-off: nothing is here any more (the regions were discarded). */
  forget(): void {
    for (const m of this.received) m.words.fill(0)
    this.receivedCount = 0
  }

  /** RECOVER_STATE's body: the received maps as little-endian u32 words. */
  receivedBytes(): Buffer[] {
    return this.received.map((m) => Buffer.from(new Uint8Array(m.words.buffer, m.words.byteOffset, m.words.byteLength)))
  }
}
