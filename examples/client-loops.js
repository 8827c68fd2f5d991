'use strict'
// The request loops of an example client: `concurrency` copies of
// loop(j, { agent, running }) over one keep-alive agent, each running while
// running() is true; stop() ends them and returns the stats they kept.
const http = require('node:http')

function clientLoops({ concurrency, stats, loop }) {
  const agent = new http.Agent({ keepAlive: true, maxSockets: concurrency })
  let running = true
  const loops = Array.from({ length: concurrency }, (_, j) => loop(j, { agent, running: () => running }))
  return {
    stats,
    async stop() {
      running = false
      await Promise.all(loops)
      agent.destroy()
      return stats
    },
  }
}

module.exports = { clientLoops }
