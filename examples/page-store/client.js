'use strict'
// A client that hammers the page-store across a migration: reads random
// pages, checks each answer (the page matches its version, versions never go
// back), and moves to the destination's address when the source stops
// answering. Records the longest gap between two good answers.
const http = require('node:http')
const { clientLoops } = require('../client-loops')

function get(host, port, page, agent) {
  return new Promise((resolve, reject) => {
    const req = http.get({ host, port, path: `/page/${page}`, agent, timeout: 10000 }, (res) => {
      let body = ''
      res.setEncoding('utf8')
      res.on('data', (c) => (body += c))
      res.on('end', () => {
        try {
          resolve(JSON.parse(body))
        } catch (err) {
          reject(err)
        }
      })
    })
    req.on('error', reject)
    req.on('timeout', () => req.destroy(new Error('timeout')))
  })
}

/**
 * A checker of answers: check(host, port, page, agent) reads the page and checks the answer (the page matches its
 * version, versions never go back), counting into stats; false when the request failed.
 */
function checker(stats) {
  const seen = new Map() // page -> highest version seen
  const startedAt = performance.now()
  let lastOk = startedAt
  return async function check(host, port, page, agent) {
    stats.requests++
    try {
      const r = await get(host, port, page, agent)
      const now = performance.now()
      stats.maxGapMs = Math.max(stats.maxGapMs, now - lastOk)
      lastOk = now
      const prev = seen.get(page) ?? 0
      if (!r.ok || r.version < prev || r.page !== page) {
        stats.wrong++
        if (stats.wrongSamples.length < 5) stats.wrongSamples.push({ page, prev, got: r })
      } else {
        stats.ok++
        seen.set(page, r.version)
      }
      return true
    } catch (err) {
      stats.errors++
      // what failed, and when (ms since the checker began): a few, for the report of a run that must have none
      if (stats.errorSamples && stats.errorSamples.length < 5) stats.errorSamples.push({ host, port, atMs: Math.round(performance.now() - startedAt), error: err.code ?? err.message })
      return false
    }
  }
}

/**
 * hammer({ targets: () => [[host, port] of the source, [host, port] of the destination], pageCount })
 *   -> { stats, stop(): Promise<stats> }
 * targets() is read on every request: the destination may appear later.
 */
function hammer({ targets, pageCount, concurrency = 4 }) {
  const stats = { requests: 0, ok: 0, wrong: 0, errors: 0, maxGapMs: 0, switchedAt: 0, wrongSamples: [], errorSamples: [] }
  const check = checker(stats)
  let target = 0
  let seed = 12345
  async function loop(j, { agent, running }) {
    while (running()) {
      seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0
      const page = seed % pageCount
      const list = targets()
      const [host, port] = list[target] ?? []
      if (!port) {
        await new Promise((r) => setTimeout(r, 2))
        continue
      }
      if (!(await check(host, port, page, agent))) {
        // the source stopped answering: the service moved on
        if (target === 0 && list[1]) {
          target = 1
          stats.switchedAt = performance.now()
        }
        await new Promise((r) => setTimeout(r, 1))
      }
    }
  }
  return clientLoops({ concurrency, stats, loop })
}

module.exports = { hammer, checker, get }
