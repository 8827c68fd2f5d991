#!/usr/bin/env node
'use strict'
// A service that keeps a page-versioned store in a guest region: a writer
// rewrites random pages at a fixed rate, and HTTP readers check every page
// they read against the version model. The model (one u32 per page) is the
// small JS state that crosses at the hand-off. Run it on both hosts:
//   source:      node server.js --name store --mib 1024 --http 8080
//   destination: uffd-migrate receive --listen 0.0.0.0:7070 -- node server.js --name store --mib 1024 --http 8080
// Prints one line per event on stdout: HTTP <port>, RESTORED, SETTLED, VERIFY ok|fail, MOVED.
const http = require('node:http')
const { parseArgs } = require('node:util')
const { Guest } = require('../../')
const { writePage, checkPage } = require('./pattern')

const { values: a } = parseArgs({
  options: {
    name: { type: 'string', default: 'page-store' },
    mib: { type: 'string', default: '256' },
    http: { type: 'string', default: '0' },
    'http-host': { type: 'string', default: '127.0.0.1' },
    writes: { type: 'string', default: '10000' }, // page writes per second
    'fill-every': { type: 'string', default: '8' }, // pages p % n === n-1 stay never-written (zero)
    'exit-after-verify': { type: 'boolean', default: false },
    // without cooperation, post-copy faults block the event loop (the baseline)
    blocking: { type: 'boolean', default: false },
    // hand the HTTP server to the guest: clients of this address are held at the hand-off and relayed to the next host
    serve: { type: 'boolean', default: false },
    // wait this long after settling before the (event-loop blocking) verify, e.g. while a benchmark's client finishes
    'verify-delay-ms': { type: 'string', default: '0' },
    // keep the per-page versions in a second guest region instead of the hand-off state: the state that crosses at
    // the hand-off is a few bytes whatever the size (bench:migrate --tiny-state measures the hand-off that way)
    'versions-in-region': { type: 'boolean', default: false },
    // a tight writer instead of the 10 ms timer: one iteration every loop-us microseconds (bench:postcopy's
    // guest-stall case, 500), writing writes/s spread over the iterations; the destination prints the longest
    // interval without an iteration between RESTORED and SETTLED (STALL line)
    'loop-us': { type: 'string', default: '0' },
  },
})
const sizeBytes = Number(a.mib) * 1024 * 1024
const writesPerSec = Number(a.writes)
const fillEvery = Number(a['fill-every'])
const out = (line) => process.stdout.write(line + '\n')

let versions
let writer
let server
let writesDone = 0
let paused = false

// Guest-cooperative faults: on the destination during post-copy, a page that
// is not here yet is awaited with ready() instead of blocking the event loop.
// Deferred writes are bounded: past that the writer skips a beat, as a real
// service waiting on I/O would.
const MAX_DEFERRED = 256
let deferred = 0
function whenLocal(region, p, fn) {
  const ps = 4096
  if (a.blocking || region.isLocal(p * ps, ps)) return fn()
  deferred++
  return region.ready(p * ps, ps).then(() => {
    deferred--
    return fn()
  })
}

// One iteration every loopUs: the loop runs synchronously (Atomics.wait sleeps between iterations) and gives
// the event loop a turn every 5 ms, so that the guest's messages (settled) get through. A blocking fault
// stops it: the longest interval between two iterations is the service's worst stall.
const stall = { maxMs: 0, iterations: 0, last: 0, on: false }
function startLoopWriter(region, u32, pageCount, pageWords, loopUs) {
  const perIter = Math.max(1, Math.round((writesPerSec * loopUs) / 1e6))
  const sleeper = new Int32Array(new SharedArrayBuffer(4))
  let seed = (process.pid * 2654435761) >>> 0
  let stopped = false
  const burst = () => {
    if (stopped) return
    const until = performance.now() + 5
    for (;;) {
      for (let i = 0; i < perIter; i++) {
        seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0
        const p = seed % pageCount
        writePage(u32, p, ++versions[p], pageWords)
      }
      writesDone += perIter
      const now = performance.now()
      if (stall.on) {
        stall.maxMs = Math.max(stall.maxMs, now - stall.last)
        stall.iterations++
      }
      stall.last = now
      if (now >= until) break
      Atomics.wait(sleeper, 0, 0, loopUs / 1000)
    }
    setImmediate(burst)
  }
  stall.last = performance.now()
  setImmediate(burst)
  return { stop: () => (stopped = true) }
}

function startWriter(region, u32, pageCount, pageWords) {
  if (Number(a['loop-us']) > 0) {
    writer = startLoopWriter(region, u32, pageCount, pageWords, Number(a['loop-us']))
    return
  }
  const perTick = Math.ceil(writesPerSec / 100)
  let seed = (process.pid * 2654435761) >>> 0
  writer = setInterval(() => {
    for (let i = 0; i < perTick && deferred < MAX_DEFERRED; i++) {
      seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0
      const p = seed % pageCount
      whenLocal(region, p, () => {
        if (!paused) writePage(u32, p, ++versions[p], pageWords)
      })
    }
    writesDone += perTick
  }, 10)
}

function startHttp(region, u32, pageCount, pageWords, port, onListening = () => {}) {
  server = http.createServer(async (req, res) => {
    const m = /^\/page\/(\d+)$/.exec(req.url || '')
    if (!m || Number(m[1]) >= pageCount) {
      res.writeHead(404).end()
      return
    }
    const p = Number(m[1])
    await whenLocal(region, p, () => {})
    const v = versions[p]
    const ok = checkPage(u32, p, v, pageWords)
    res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ page: p, version: v, ok, pid: process.pid }))
  })
  // Without --serve the server closes at the hand-off and its clients must reconnect elsewhere: no idle
  // keep-alive. A served server keeps its connections (the guest relays them), with the usual keep-alive.
  if (!a.serve) server.keepAliveTimeout = 1
  server.listen(port, a['http-host'], () => {
    out(`HTTP ${server.address().port}`)
    onListening()
  })
  return server
}

async function main() {
  const guest = await Guest.start({
    name: a.name,
    regions: a['versions-in-region'] ? { store: sizeBytes, versions: (sizeBytes / 4096) * 4 } : { store: sizeBytes },
    pause: async () => {
      paused = true
      if (writer?.stop) writer.stop()
      else clearInterval(writer)
      // a served server stays open: the guest holds its requests, then relays them
      if (!a.serve) {
        await new Promise((r) => {
          server.close(r)
          server.closeAllConnections()
        })
      }
      if (a['versions-in-region']) return { writesDone }
      return { versions: Buffer.from(versions.buffer, versions.byteOffset, versions.byteLength), writesDone }
    },
    resume: () => start(false),
  })
  let served
  const region = guest.regions.store
  const ps = 4096
  const pageCount = region.sizeBytes / ps
  const pageWords = ps / 4
  const u32 = new Uint32Array(region.buffer)

  function start(restored) {
    paused = false
    startWriter(region, u32, pageCount, pageWords)
    // a served server never closed: after a failed or cancelled migration it answers again by itself
    // RESTORED once the service answers (its server listens): a client that waits for the line is not refused
    return new Promise((resolve) => {
      const listening = () => {
        if (restored) out('RESTORED')
        resolve()
      }
      if (!served) {
        const s = startHttp(region, u32, pageCount, pageWords, Number(a.http), listening)
        if (a.serve) guest.serve((served = s))
      } else listening()
    })
  }

  if (guest.restored) {
    const s = guest.state
    versions = a['versions-in-region']
      ? new Uint32Array(guest.regions.versions.buffer)
      : new Uint32Array(s.versions.buffer.slice(s.versions.byteOffset, s.versions.byteOffset + s.versions.byteLength))
    writesDone = s.writesDone
    stall.on = true
    stall.last = performance.now()
    await start(true)
    await guest.settled
    stall.on = false
    if (Number(a['loop-us']) > 0) out(`STALL ${JSON.stringify({ maxMs: stall.maxMs, iterations: stall.iterations })}`)
    out('SETTLED')
    await new Promise((r) => setTimeout(r, Number(a['verify-delay-ms'])))
    let bad = 0
    let first = -1
    for (let p = 0; p < pageCount; p++) {
      if (!checkPage(u32, p, versions[p], pageWords)) {
        if (first < 0) first = p
        bad++
      }
    }
    out(bad === 0 ? `VERIFY ok pages=${pageCount}` : `VERIFY fail bad=${bad} first=${first} version=${versions[first]}`)
    if (a['exit-after-verify']) process.exit(bad === 0 ? 0 : 1)
    return
  }
  versions = a['versions-in-region'] ? new Uint32Array(guest.regions.versions.buffer) : new Uint32Array(pageCount)
  for (let p = 0; p < pageCount; p++) {
    if (p % fillEvery === fillEvery - 1) continue
    writePage(u32, p, ++versions[p], pageWords)
  }
  // Served: no 'moved' listener, so that the guest relays the clients of this address to the next host and
  // exits once they are idle (a listener would keep the process, and exiting here would drop them).
  if (!a.serve) {
    guest.on('moved', (report) => {
      out(`MOVED ${JSON.stringify({ downtimeMs: report.downtimeMs, totalMs: report.totalMs })}`)
      setTimeout(() => process.exit(0), 20)
    })
  }
  start(false)
  out('READY')
}

main().catch((err) => {
  process.stderr.write(`page-store: ${err.code ?? ''} ${err.message}\n`)
  process.exit(1)
})
