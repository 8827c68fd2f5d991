/**
 * Adaptive prepaging by bubbling (Hines, Deshpande, Gopalan 2009): every
 * demand fault becomes a pivot, and the push sends the pages around it,
 * widening forward (pivot+1, +2, ...) and, less, backward; an edge stops at a
 * page already sent, except where the service itself overtook the push (a
 * sequential scan fetching page after page on demand): that forward edge
 * follows the service, jumping over what it took. The k most recent pivots
 * share the push round-robin, and a sticky initial pivot walks the regions
 * front to back and never stops, so the push always makes progress.
 * Adaptivity (as CRIU's lazy-pages adapts its transfer length): a pivot's
 * window per turn doubles while faults keep landing next to it and falls
 * back when they land elsewhere. Random faults leave bubbles that stopped at
 * each other with holes between them: the holes of the most recently faulted
 * areas (2 MiB) go before the sticky pivot's walk.
 *
 * Everything works on the pending bitmaps: one turn costs O(pages it returns).
 */
import type { PageBitmap } from '../bitmap'
import { type PushPolicy, type PushRun, SequentialPush } from './push-policy'

export interface BubblingOptions {
  /** How many recent pivots share the push (the paper's best: 7). */
  pivots: number
  /** Grow windows of pivots that keep getting faults near them. */
  adaptive: boolean
  /** Pages per turn of a fresh pivot. */
  initialWindow: number
  /** Largest window per turn. */
  maxWindow: number
  /** One backward page for every `backwardRatio` forward pages (forward matters most). */
  backwardRatio: number
  /**
   * Pages per fault area: once the bubbles stopped at sent pages, the holes
   * left in the areas that faulted most recently are filled before the
   * sticky pivot goes on (0: off).
   */
  areaPages: number
  /** How many recent fault areas are remembered. */
  areas: number
}

export const BUBBLE_DEFAULTS: BubblingOptions = { pivots: 7, adaptive: true, initialWindow: 64, maxWindow: 1024, backwardRatio: 4, areaPages: 512, areas: 32 }

interface Pivot {
  region: number
  center: number
  /** Next page forward / backward; -1 once that edge stopped. */
  fwd: number
  bwd: number
  /** The page already sent where the forward edge stopped (-1: moving, or stopped at the region's end). */
  fwdStop: number
  /**
   * The service went past this pivot's forward edge, taking every page on the
   * way (a sequential scan faster than the push can react): the edge now
   * follows it, jumping over pages the service took instead of stopping there.
   */
  streaming: boolean
  /** Pages per turn. */
  window: number
  /** Faults seen elsewhere since this pivot was last hit. */
  misses: number
  backwardCredit: number
}

/** An aligned block of pages that faulted recently; `cursor`: next page to look at. */
interface FaultArea {
  region: number
  start: number
  cursor: number
  end: number
}

export class BubblingPush implements PushPolicy {
  readonly name: string
  private pivots: Pivot[] = []
  /** Most recent first. */
  private areas: FaultArea[] = []
  private turn = 0
  /** The sticky initial pivot: front to back over every region, skipping sent pages. */
  private readonly sticky: SequentialPush

  constructor(
    private readonly pending: PageBitmap[],
    private readonly opts: BubblingOptions = BUBBLE_DEFAULTS,
  ) {
    this.name = opts.pivots === 1 && !opts.adaptive ? 'bubble1' : `bubble${opts.pivots}${opts.adaptive ? '-adaptive' : ''}`
    this.sticky = new SequentialPush(pending)
  }

  /** The pivots, most recent first, for tests and logs. */
  get pivotState(): { region: number; center: number; fwd: number; bwd: number; window: number }[] {
    return this.pivots.map(({ region, center, fwd, bwd, window }) => ({ region, center, fwd, bwd, window }))
  }

  onFault(region: number, page: number): void {
    this.noteArea(region, page)
    // A fault within a window of a moving edge is a hit: that pivot grows
    // instead of a new one starting next to it. A fault behind the edges (a
    // page of the bubble still in flight, or a hole) says nothing about where
    // the edges are going: counting it would let an edge that has run out of
    // the working set keep the push forever.
    const map = this.pending[region]
    for (const p of this.pivots) {
      if (p.region !== region) continue
      // The forward edge stopped at a page the service had already fetched, and
      // the service took every page from there to this fault: a sequential scan
      // overtook the push. Its faults reach this policy late and in batches (the
      // demand thread reports them every millisecond), so the pages right after
      // a fault are often taken too: a hit, and the edge goes on from the first
      // page still pending after the fault, instead of the stale fault starting
      // a pivot whose neighbours are all gone (the push then went backwards only).
      const pastStop = p.fwd === -1 && p.fwdStop !== -1 && page >= p.fwdStop && page <= p.fwdStop + p.window && map.nextSet(p.fwdStop, page) === -1
      const nearFwd = p.fwd !== -1 && page >= p.fwd - p.window && page <= p.fwd + p.window
      const nearBwd = p.bwd !== -1 && page >= p.bwd - p.window && page <= p.bwd + p.window
      if (!pastStop && !nearFwd && !nearBwd) continue
      if (this.opts.adaptive) p.window = Math.min(this.opts.maxWindow, p.window * 2)
      p.misses = 0
      if (pastStop) {
        p.fwd = map.nextSet(page + 1, map.size)
        p.fwdStop = -1
        p.streaming = true
      } else if (nearFwd && page >= p.fwd && map.nextSet(p.fwd, page) === -1) {
        // The service is ahead of the push and took every page up to here
        // (sequential scans): continue from where it is. Pages still pending in
        // between are not skipped.
        p.fwd = page + 1 < map.size ? page + 1 : -1
        p.streaming = true
      }
      this.bump(p)
      return
    }
    for (const p of this.pivots) {
      if (++p.misses >= this.opts.pivots) p.window = this.opts.initialWindow
    }
    this.addPivot(region, page, this.opts.initialWindow)
  }

  onHint(region: number, firstPage: number, pageCount: number): void {
    // A hinted range goes to the front, in one turn when it fits.
    // Forward only: the service named exactly what it wants.
    const window = Math.min(this.opts.maxWindow, Math.max(this.opts.initialWindow, pageCount))
    this.addPivot(region, firstPage - 1, window, false)
  }

  private addPivot(region: number, page: number, window: number, backward = true): void {
    const size = this.pending[region].size
    const bwd = backward ? page - 1 : -1
    this.pivots.unshift({ region, center: page, fwd: page + 1 < size ? page + 1 : -1, bwd, fwdStop: -1, streaming: false, window, misses: 0, backwardCredit: 0 })
    if (this.pivots.length > this.opts.pivots) this.pivots.length = this.opts.pivots
    this.turn = 0
  }

  /** Most recently hit pivot first. */
  private bump(p: Pivot): void {
    const i = this.pivots.indexOf(p)
    if (i > 0) {
      this.pivots.splice(i, 1)
      this.pivots.unshift(p)
      this.turn = 0
    }
  }

  next(maxPages: number): PushRun[] {
    const out: PushRun[] = []
    let budget = maxPages
    let idle = 0 // pivots in a row that gave nothing
    while (budget > 0 && this.pivots.length > 0 && idle < this.pivots.length) {
      if (this.turn >= this.pivots.length) this.turn = 0
      const p = this.pivots[this.turn]
      const got = this.expand(p, Math.min(budget, p.window), out)
      budget -= got
      if (p.fwd === -1 && p.bwd === -1) {
        this.pivots.splice(this.turn, 1)
        idle = 0
        continue
      }
      idle = got === 0 ? idle + 1 : 0
      this.turn++
    }
    if (budget > 0) budget -= this.fillAreas(budget, out)
    if (budget > 0) out.push(...this.sticky.next(budget))
    return out
  }

  /**
   * Random faults leave the bubbles stopped at each other with holes between
   * them; the service will fault on those holes next. The holes of the areas
   * that faulted last go before the sticky pivot's walk.
   */
  private noteArea(region: number, page: number): void {
    const size = this.opts.areaPages
    if (size <= 0) return
    const start = page - (page % size)
    const i = this.areas.findIndex((a) => a.region === region && a.start === start)
    if (i === 0) return
    const area = i > 0 ? this.areas.splice(i, 1)[0] : { region, start, cursor: start, end: Math.min(this.pending[region].size, start + size) }
    this.areas.unshift(area)
    if (this.areas.length > this.opts.areas) this.areas.length = this.opts.areas
  }

  private fillAreas(budget: number, out: PushRun[]): number {
    let taken = 0
    while (taken < budget && this.areas.length > 0) {
      const a = this.areas[0]
      const map = this.pending[a.region]
      const p = map.nextSet(a.cursor, a.end)
      if (p === -1) {
        this.areas.shift()
        continue
      }
      let q = map.nextClear(p, Math.min(a.end, p + budget - taken))
      if (q === -1) q = Math.min(a.end, p + budget - taken)
      out.push({ region: a.region, firstPage: p, pageCount: q - p })
      taken += q - p
      a.cursor = q
    }
    return taken
  }

  /** Up to n pages around p; an edge stops at the first page already sent. */
  private expand(p: Pivot, n: number, out: PushRun[]): number {
    const map = this.pending[p.region]
    let backward = 0
    if (p.bwd !== -1) {
      p.backwardCredit += n / this.opts.backwardRatio
      backward = Math.min(n, Math.floor(p.backwardCredit))
      p.backwardCredit -= backward
    }
    let taken = 0
    if (p.fwd !== -1) {
      let room = n - backward
      for (;;) {
        const limit = Math.min(map.size, p.fwd + room)
        let end = p.fwd
        while (end < limit && map.has(end)) end++
        if (end > p.fwd) out.push({ region: p.region, firstPage: p.fwd, pageCount: end - p.fwd })
        taken += end - p.fwd
        room -= end - p.fwd
        if (end >= map.size) {
          p.fwd = p.fwdStop = -1
          break
        }
        if (end === limit) {
          p.fwd = end
          break
        }
        // end is already sent: the edge stops there, unless the service is the one ahead (streaming), in which
        // case it jumps over what the service took, up to a window, to get in front of it
        const next = p.streaming ? map.nextSet(end, Math.min(map.size, end + p.window + 1)) : -1
        if (next === -1) {
          p.fwd = -1
          p.fwdStop = end
          break
        }
        p.fwd = next
        if (room <= 0) break
      }
    } else {
      backward = n // only the backward edge is left
    }
    if (p.bwd !== -1 && backward > 0) {
      const limit = Math.max(-1, p.bwd - backward) // exclusive
      let first = p.bwd
      while (first > limit && map.has(first)) first--
      if (first < p.bwd) out.push({ region: p.region, firstPage: first + 1, pageCount: p.bwd - first })
      taken += p.bwd - first
      p.bwd = first > limit ? -1 : first
    }
    return taken
  }
}
