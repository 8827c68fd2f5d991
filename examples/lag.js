'use strict'
// Event-loop blocked time, as a service sees it: a timer that should fire
// every intervalMs; any lateness is time the loop could not run.
function lagMeter(intervalMs = 2) {
  let blockedMs = 0
  let maxMs = 0
  const start = performance.now()
  let last = start
  const timer = setInterval(() => {
    const now = performance.now()
    const late = now - last - intervalMs
    if (late > 0.5) {
      blockedMs += late
      maxMs = Math.max(maxMs, late)
    }
    last = now
  }, intervalMs)
  return {
    stop() {
      clearInterval(timer)
      return { blockedMs, maxBlockMs: maxMs, durationMs: performance.now() - start }
    },
  }
}
module.exports = { lagMeter }
