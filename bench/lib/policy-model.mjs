// A model of table A without network or CPU noise: the real push policies
// (dist/agent/*), the scan-service's touch order, and a push that moves a
// fixed number of pages while a fault is served and while a local page is
// touched. It shows what each policy can reach on a workload, and the bound
// of an oracle that pushes exactly the working set (front to back) and nothing
// else: no policy that does not know the access order can do better.
import { createRequire } from 'node:module'
import { repoRoot } from './limits.mjs'

const require = createRequire(import.meta.url)
const { PageBitmap } = require(`${repoRoot}/dist/bitmap.js`)
const { createPushPolicy } = require(`${repoRoot}/dist/agent/prepaging.js`)
const { SequentialPush } = require(`${repoRoot}/dist/agent/push-policy.js`)
const { touchOrder } = require(`${repoRoot}/examples/scan-service/order.js`) // the service's own order

/**
 * Network faults (% of touched pages) for one strategy ('push', 'bubble',
 * 'bubble1', or 'oracle'). pagesPerFault: pages the push delivers while one
 * fault is served; pagesPerTouch: while one local page is touched.
 */
export function modelFaults({ guestPages, wsPages, firstPage, pattern, strategy, pagesPerFault = 64, pagesPerTouch = 0.3, batch = 256 }) {
  const pending = new PageBitmap(guestPages)
  pending.setRange(0, guestPages)
  // the oracle walks its own map: the working-set pages still pending
  const oracleMap = strategy === 'oracle' ? new PageBitmap(guestPages) : undefined
  oracleMap?.setRange(firstPage, wsPages)
  const policy = oracleMap ? new SequentialPush([oracleMap]) : createPushPolicy({ strategy }, [pending])
  const take = (first, count) => {
    oracleMap?.clearRange(first, count)
    return pending.clearRange(first, count)
  }
  let credit = 0
  const push = (pages) => {
    credit += pages
    while (credit >= 1) {
      const runs = policy.next(Math.min(batch, Math.floor(credit)))
      if (runs.length === 0) return
      for (const r of runs) credit -= Math.max(take(r.firstPage, r.pageCount), 1)
    }
  }
  let faults = 0
  for (const p of touchOrder(wsPages, firstPage, pattern)) {
    if (pending.has(p)) {
      faults++
      take(p, 1)
      policy.onFault(0, p)
      push(pagesPerFault)
    } else {
      push(pagesPerTouch)
    }
  }
  return (100 * faults) / wsPages
}
