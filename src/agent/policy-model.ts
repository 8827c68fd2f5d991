/**
 * A model of post-copy without network or CPU noise: the real push policies
 * on a given touch order, with a push that moves a fixed number of pages
 * while a fault is served and while a local page is touched. It shows what
 * each policy can reach on a workload, and the bound of an oracle that pushes
 * exactly the working set (front to back) and nothing else: no policy that
 * does not know the access order can do better. Used by bench:postcopy
 * (table A0) and the prepaging unit test.
 */
import { PageBitmap } from '../bitmap'
import { createPushPolicy, type PrepagingStrategy } from './prepaging'
import { SequentialPush } from './push-policy'

export interface ModelInput {
  guestPages: number
  wsPages: number
  firstPage: number
  /** The pages of the working set in the order the service touches them. */
  order: ArrayLike<number>
  strategy: PrepagingStrategy | 'oracle'
  /** Pages the push delivers while one fault is served. */
  pagesPerFault?: number
  /** Pages the push delivers while one local page is touched. */
  pagesPerTouch?: number
  batch?: number
  /**
   * Faults the service takes before the policy hears of one (0: at once). The
   * agent hears of faults in batches (the demand thread reports them every
   * millisecond, ~15 faults of a sequential scan on this VM).
   */
  faultReportLag?: number
}

/** Network faults, % of touched pages. */
export function modelFaults({ guestPages, wsPages, firstPage, order, strategy, pagesPerFault = 64, pagesPerTouch = 0.3, batch = 256, faultReportLag = 0 }: ModelInput): number {
  const pending = new PageBitmap(guestPages)
  pending.setRange(0, guestPages)
  // the oracle walks its own map: the working-set pages still pending
  const oracleMap = strategy === 'oracle' ? new PageBitmap(guestPages) : undefined
  oracleMap?.setRange(firstPage, wsPages)
  const policy = oracleMap ? new SequentialPush([oracleMap]) : createPushPolicy({ strategy: strategy as PrepagingStrategy }, [pending])
  const take = (first: number, count: number) => {
    oracleMap?.clearRange(first, count)
    return pending.clearRange(first, count)
  }
  let credit = 0
  const push = (pages: number) => {
    credit += pages
    while (credit >= 1) {
      const runs = policy.next(Math.min(batch, Math.floor(credit)))
      if (runs.length === 0) return
      for (const r of runs) credit -= Math.max(take(r.firstPage, r.pageCount), 1)
    }
  }
  let faults = 0
  const unheard: number[] = []
  for (let i = 0; i < order.length; i++) {
    const p = order[i]
    if (pending.has(p)) {
      faults++
      take(p, 1)
      unheard.push(p)
      if (unheard.length > faultReportLag) policy.onFault(0, unheard.shift()!)
      push(pagesPerFault)
    } else {
      push(pagesPerTouch)
    }
  }
  return (100 * faults) / wsPages
}
