'use strict'
// Hammers the kv-store across a migration and checks every answer against its
// own model. Each of `concurrency` loops owns the keys i % concurrency === j,
// so its model is exact; a write whose answer was lost in the hand-off makes
// that key uncertain until the next read settles it.
const http = require('node:http')
const { clientLoops } = require('../client-loops')
const { valueFor } = require('./store')

function request(target, method, key, version, agent) {
  const [host, port] = target
  const body = method === 'PUT' ? valueFor(key, version) : undefined
  return new Promise((resolve, reject) => {
    const req = http.request({ host, port, method, path: `/kv/${key}`, agent, timeout: 15000, headers: body ? { 'x-version': String(version), 'content-length': Buffer.byteLength(body, 'latin1') } : {} }, (res) => {
      const chunks = []
      res.on('data', (c) => chunks.push(c))
      res.on('end', () => resolve({ status: res.statusCode, version: Number(res.headers['x-version'] || 0), body: Buffer.concat(chunks).toString('latin1') }))
    })
    req.on('error', reject)
    req.on('timeout', () => req.destroy(new Error('timeout')))
    req.end(body, 'latin1')
  })
}

function hammer({ targets, keys, concurrency = 8 }) {
  const stats = { requests: 0, ok: 0, wrong: 0, errors: 0, maxGapMs: 0, wrongSamples: [] }
  const model = new Map() // key -> version (0: deleted), for keys this client touched
  const uncertain = new Map() // key -> [possible versions]
  let target = 0
  let lastOk = performance.now()
  let seed = 4242
  const rnd = (n) => ((seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0) % n)
  async function loop(j, { agent, running }) {
    while (running()) {
      const key = `k${j + concurrency * rnd(Math.floor(keys / concurrency))}`
      const known = model.has(key) ? model.get(key) : 2 // the source starts every key at version 2
      const op = rnd(100)
      const method = op < 80 ? 'GET' : op < 95 ? 'PUT' : 'DELETE'
      const version = method === 'PUT' ? known + 1 : 0
      stats.requests++
      let r
      try {
        r = await request(targets()[target], method, key, version, agent)
      } catch {
        stats.errors++
        if (target === 0 && targets()[1]) target = 1
        if (method !== 'GET') uncertain.set(key, [known, method === 'PUT' ? version : 0])
        await new Promise((res) => setTimeout(res, 1))
        continue
      }
      const now = performance.now()
      stats.maxGapMs = Math.max(stats.maxGapMs, now - lastOk)
      lastOk = now
      let good
      if (method === 'GET') {
        const got = r.status === 404 ? 0 : r.version
        const allowed = uncertain.get(key) ?? [known]
        good = allowed.includes(got) && (got === 0 ? r.status === 404 : r.body === valueFor(key, got))
        if (good) {
          model.set(key, got)
          uncertain.delete(key)
        }
      } else if (method === 'PUT') {
        good = r.status === 204
        if (good) model.set(key, version)
      } else {
        good = r.status === (known === 0 ? 404 : 204)
        if (uncertain.has(key)) good = r.status === 204 || r.status === 404
        if (good) model.set(key, 0)
      }
      if (method !== 'GET' && good) uncertain.delete(key)
      if (good) stats.ok++
      else {
        stats.wrong++
        if (stats.wrongSamples.length < 5) stats.wrongSamples.push({ method, key, known, status: r.status, version: r.version })
      }
    }
  }
  return clientLoops({ concurrency, stats, loop })
}

module.exports = { hammer }
