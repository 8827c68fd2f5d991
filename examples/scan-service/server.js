#!/usr/bin/env node
'use strict'
// A service whose work touches memory in a sequential or a random pattern:
// the workload of the post-copy benchmark (Hines et al.'s Table 2 shape).
// On the destination it runs its workload at once after the hand-off: it
// reads every page of a working set (--ws-mib at --ws-offset-mib) in order or
// in a random permutation, checks each page, and reports how long it took and
// how long it was stalled in page faults.
//   --free-pct P   the source frees P% of its memory (1 MiB slabs) before the
//                  migration; with --no-report it just forgets them (their old
//                  bytes stay and travel), otherwise it reports them with free().
// stdout: READY, RESTORED, RESULT {...}, SETTLED, VERIFY ok|fail
const { parseArgs } = require('node:util')
const { Guest } = require('../../')
const { writePage, checkPage } = require('../page-store/pattern')
const { touchOrder } = require('./order')

const { values: a } = parseArgs({
  options: {
    name: { type: 'string', default: 'scan' },
    mib: { type: 'string', default: '1024' },
    'ws-mib': { type: 'string', default: '0' },
    'ws-offset-mib': { type: 'string', default: '320' },
    pattern: { type: 'string', default: 'sequential' },
    'free-pct': { type: 'string', default: '0' },
    'no-report': { type: 'boolean', default: false },
    http: { type: 'string', default: '0' }, // accepted for the harness; no HTTP here
    'http-host': { type: 'string', default: '127.0.0.1' },
    'exit-after-verify': { type: 'boolean', default: false },
    'linger-ms': { type: 'string', default: '0' }, // after VERIFY, before exiting (tests)
  },
})
const out = (line) => process.stdout.write(line + '\n')
const PS = 4096
const SLAB_PAGES = 256 // 1 MiB
const sizeBytes = Number(a.mib) << 20
const pageCount = sizeBytes / PS
const pageWords = PS / 4

// Deterministic on both hosts: which slabs the source freed.
function freedSlab(i) {
  const pct = Number(a['free-pct'])
  const h = (Math.imul(i + 1, 0x9e3779b1) >>> 0) % 100
  return h < pct
}

async function main() {
  const guest = await Guest.start({ name: a.name, regions: { mem: sizeBytes }, pause: () => ({ pattern: a.pattern }) })
  const region = guest.regions.mem
  const u32 = new Uint32Array(region.buffer)
  const expected = (p) => (freedSlab(Math.floor(p / SLAB_PAGES)) && !a['no-report'] ? 0 : 1)
  if (!guest.restored) {
    for (let p = 0; p < pageCount; p++) writePage(u32, p, 1, pageWords)
    let freed = 0
    for (let s = 0; s < pageCount / SLAB_PAGES; s++) {
      if (!freedSlab(s)) continue
      freed++
      if (!a['no-report']) region.free(s * SLAB_PAGES * PS, SLAB_PAGES * PS)
    }
    guest.on('moved', () => setTimeout(() => process.exit(0), 20))
    out(`READY freedSlabs=${freed}`)
    return
  }
  out('RESTORED')
  const wsPages = (Number(a['ws-mib']) << 20) / PS
  const first = (Number(a['ws-offset-mib']) << 20) / PS
  const order = touchOrder(wsPages, first, a.pattern)
  // The workload: touch each page once, check it; a touch slower than 20 us
  // was a stall in a page fault.
  let blockedNs = 0n
  let blockedTouches = 0
  let longTouches = 0
  let bad = 0
  const t0 = process.hrtime.bigint()
  for (let i = 0; i < wsPages; i++) {
    const p = order[i]
    const s = process.hrtime.bigint()
    const v = u32[p * pageWords]
    const d = process.hrtime.bigint() - s
    if (d > 20_000n) { blockedNs += d; blockedTouches++; if (d > 1_000_000n) longTouches++ }
    if (v !== 0 && !checkPage(u32, p, expected(p), pageWords)) bad++
  }
  const workloadMs = Number(process.hrtime.bigint() - t0) / 1e6
  out(`RESULT ${JSON.stringify({ touched: wsPages, workloadMs, blockedMs: Number(blockedNs) / 1e6, blockedTouches, longTouches, bad })}`)
  await guest.settled
  out('SETTLED')
  let wrong = bad
  for (let p = 0; p < pageCount; p++) if (!checkPage(u32, p, expected(p), pageWords)) wrong++
  out(wrong ? `VERIFY fail bad=${wrong}` : `VERIFY ok pages=${pageCount}`)
  if (a['exit-after-verify']) setTimeout(() => process.exit(wrong ? 1 : 0), Number(a['linger-ms']))
}

main().catch((err) => {
  process.stderr.write(`scan-service: ${err.code ?? ''} ${err.message}\n`)
  process.exit(1)
})
