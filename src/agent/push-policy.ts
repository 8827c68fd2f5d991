/**
 * What the source pushes next after the hand-off. The policy sees the pending
 * map (pages the destination still lacks) and the destination's faults and
 * hints; it picks runs in O(batch). Sequential push is the baseline here;
 * bubbling.ts holds the bubbling policies and prepaging.ts builds a policy by name.
 */
import type { PageBitmap } from '../bitmap'

export interface PushRun {
  region: number
  firstPage: number
  pageCount: number
}

export interface PushPolicy {
  readonly name: string
  /** A demand fault at (region, page): a pivot for prepaging policies. */
  onFault(region: number, page: number): void
  /** A guest hint that pages will be needed soon (willNeed / ready). */
  onHint(region: number, firstPage: number, pageCount: number): void
  /** Up to maxPages pending pages to push next, as runs; [] when nothing is pending. */
  next(maxPages: number): PushRun[]
}

/** Walks every region front to back: the classic background push. */
export class SequentialPush implements PushPolicy {
  readonly name: string = 'push'
  protected cursorRegion = 0
  protected cursorPage = 0

  constructor(protected readonly pending: PageBitmap[]) {}

  onFault(): void {}
  onHint(): void {}

  next(maxPages: number): PushRun[] {
    const out: PushRun[] = []
    let budget = maxPages
    for (let tries = 0; tries <= this.pending.length && budget > 0; ) {
      const map = this.pending[this.cursorRegion]
      const start = map.nextSet(this.cursorPage)
      if (start === -1) {
        this.cursorRegion = (this.cursorRegion + 1) % this.pending.length
        this.cursorPage = 0
        tries++
        continue
      }
      let end = map.nextClear(start, Math.min(map.size, start + budget))
      if (end === -1) end = Math.min(map.size, start + budget)
      out.push({ region: this.cursorRegion, firstPage: start, pageCount: end - start })
      budget -= end - start
      this.cursorPage = end
    }
    return out
  }
}

/**
 * Demand paging only: nothing is pushed while the guest faults. Once it went
 * idleFillMs without a fault or hint, the rest is filled front to back so that
 * the migration can settle (a source cannot wait forever for pages nobody touches).
 */
export class DemandOnly implements PushPolicy {
  readonly name = 'demand'
  private lastActivity = Date.now()
  private readonly fill: SequentialPush

  constructor(pending: PageBitmap[], private readonly idleFillMs: number) {
    this.fill = new SequentialPush(pending)
  }

  onFault(): void {
    this.lastActivity = Date.now()
  }
  onHint(): void {
    this.lastActivity = Date.now()
  }
  next(maxPages: number): PushRun[] {
    return Date.now() - this.lastActivity < this.idleFillMs ? [] : this.fill.next(maxPages)
  }
}
