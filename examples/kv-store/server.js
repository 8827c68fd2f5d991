#!/usr/bin/env node
'use strict'
// An HTTP key-value service whose hash table and value arena live in guest
// regions; emptied slabs are reported with free(). With --ready, its request
// path awaits region.ready() for the table slot and the value it needs, so
// that during post-copy the event loop never blocks in a page fault.
//   source:      node examples/kv-store/server.js --name kv --http 8080
//   destination: uffd-migrate receive --listen 0.0.0.0:7070 -- node examples/kv-store/server.js --name kv --http 8080
// stdout: READY, HTTP <port>, LAG_BEFORE {...} (source), RESTORED, LAG {...}, READY_WAITS <n>, SETTLED, VERIFY ok|fail
const http = require('node:http')
const { parseArgs } = require('node:util')
const { Guest } = require('../../')
const { Store, valueFor, SLAB } = require('./store')
const { lagMeter } = require('../lag')

const { values: a } = parseArgs({
  options: {
    name: { type: 'string', default: 'kv' },
    'table-mib': { type: 'string', default: '16' },
    'arena-mib': { type: 'string', default: '1024' },
    keys: { type: 'string', default: '100000' },
    http: { type: 'string', default: '0' },
    'http-host': { type: 'string', default: '127.0.0.1' },
    ready: { type: 'boolean', default: false },
    'exit-after-verify': { type: 'boolean', default: false },
  },
})
const out = (line) => process.stdout.write(line + '\n')
const nKeys = Number(a.keys)
let server
let store
let lagBefore

async function main() {
  const guest = await Guest.start({
    name: a.name,
    regions: { table: Number(a['table-mib']) << 20, arena: Number(a['arena-mib']) << 20 },
    pause: async () => {
      // the same meter before the migration: what the client's load alone costs the loop
      if (lagBefore) out(`LAG_BEFORE ${JSON.stringify(lagBefore.stop())}`)
      await new Promise((r) => {
        server.close(r)
        server.closeAllConnections()
      })
      return store.state()
    },
    resume: () => listen(),
  })
  const { table, arena } = guest.regions
  const lag = guest.restored ? lagMeter() : undefined
  store = new Store(table, arena, guest.restored ? guest.state : undefined)

  // Guest-cooperative page faults: wait for the pages off the event loop.
  let readyWaits = 0
  async function local(region, [off, len]) {
    if (!a.ready || len === 0 || region.isLocal(off, len)) return
    readyWaits++
    await region.ready(off, len)
  }

  // A lookup, and a delete's backward shift, read key's probe chain up to its first empty slot, which may lie on a
  // later table page than its home slot: each page of the chain is made local before it is read.
  async function localChain(key) {
    if (!a.ready) return
    const pages = Math.ceil(table.sizeBytes / 4096)
    for (let page = store.homePage(key), n = 0; n < pages; n++, page = (page + 1) % pages) {
      await local(table, [page * 4096, Math.min(4096, table.sizeBytes - page * 4096)])
      if (store.chainEndsOnPage(key, page)) return
    }
  }

  function listen() {
    server = http.createServer(async (req, res) => {
      const m = /^\/kv\/([A-Za-z0-9_]{1,11})$/.exec(req.url || '')
      if (!m) return res.writeHead(404).end()
      const key = m[1]
      try {
        // the body and the current slab first: while they come other requests run and may lengthen key's probe
        // chain, so the chain is made local last (a slab the allocator moves to is empty: freed, or never used)
        const chunks = []
        if (req.method === 'PUT') {
          for await (const c of req) chunks.push(c)
          await local(arena, [store.current * SLAB, SLAB])
        }
        await localChain(key)
        if (req.method === 'GET') {
          const { slot, found } = store.find(key)
          if (!found) return res.writeHead(404).end()
          await local(arena, store.valueRange(slot))
          return res.writeHead(200, { 'x-version': String(store.version(key)) }).end(store.get(key))
        }
        if (req.method === 'PUT') {
          store.put(key, Buffer.concat(chunks).toString('latin1'), Number(req.headers['x-version']) || 1)
          return res.writeHead(204).end()
        }
        if (req.method === 'DELETE') return res.writeHead(store.delete(key) ? 204 : 404).end()
        res.writeHead(405).end()
      } catch (err) {
        res.writeHead(500).end(err.message)
      }
    })
    server.keepAliveTimeout = 1
    server.listen(Number(a.http), a['http-host'], () => out(`HTTP ${server.address().port}`))
  }

  if (guest.restored) {
    listen()
    out('RESTORED')
    await guest.settled
    out(`LAG ${JSON.stringify(lag.stop())}`)
    out(`READY_WAITS ${readyWaits}`)
    out('SETTLED')
    let bad = 0
    let live = 0
    for (let i = 0; i < nKeys; i++) {
      const key = `k${i}`
      const v = store.version(key)
      if (!v) continue
      live++
      if (store.get(key) !== valueFor(key, v)) bad++
    }
    out(bad ? `VERIFY fail bad=${bad} live=${live}` : `VERIFY ok keys=${live} freedSlabs=${store.freedSlabs}`)
    if (a['exit-after-verify']) process.exit(bad ? 1 : 0)
    return
  }
  // Two generations of every key: the first generation's slabs empty out
  // and are reported free, as a long-running store's would be.
  for (const version of [1, 2]) for (let i = 0; i < nKeys; i++) store.put(`k${i}`, valueFor(`k${i}`, version), version)
  guest.on('moved', () => setTimeout(() => process.exit(0), 20))
  lagBefore = lagMeter()
  listen()
  out(`READY freedSlabs=${store.freedSlabs}`)
}

main().catch((err) => {
  process.stderr.write(`kv-store: ${err.code ?? ''} ${err.message}\n`)
  process.exit(1)
})
