'use strict'
// The pages of a working set in the order the scan-service touches them:
// front to back, or a fixed random permutation (the same on every run, so the
// model of src/agent/policy-model.ts can replay it).
function touchOrder(wsPages, firstPage, pattern) {
  const order = new Uint32Array(wsPages)
  for (let i = 0; i < wsPages; i++) order[i] = firstPage + i
  if (pattern === 'random') {
    let seed = 7
    for (let i = wsPages - 1; i > 0; i--) {
      seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0
      const j = seed % (i + 1)
      const t = order[i]
      order[i] = order[j]
      order[j] = t
    }
  }
  return order
}

module.exports = { touchOrder }
