// Table A0's model (src/agent/policy-model.ts, from dist/) on the scan-service's own touch order.
import { createRequire } from 'node:module'
import { repoRoot } from './limits.mjs'

const require = createRequire(import.meta.url)
const model = require(`${repoRoot}/dist/agent/policy-model.js`)
const { touchOrder } = require(`${repoRoot}/examples/scan-service/order.js`) // the service's own order

/** Network faults (% of touched pages) for one strategy ('push', 'bubble', 'bubble1', or 'oracle'). */
export function modelFaults({ wsPages, firstPage, pattern, ...rest }) {
  return model.modelFaults({ ...rest, wsPages, firstPage, order: touchOrder(wsPages, firstPage, pattern) })
}
