#!/usr/bin/env node
'use strict'
// Migrates one of the examples between two processes on this machine and
// prints the report:   node examples/run.js kv-store [--mode postcopy] [--ready]
//                      node examples/run.js scan-service --ws-mib 128 --pattern random [--prepaging bubble]
//                      node examples/run.js page-store [--mib 256] [--writes 10000]
//                      --agent-nice N: the migration agents run at nice N (UFFD_MIGRATE_AGENT_NICE)
const { parseArgs } = require('node:util')
const { migrateExample } = require('../dist/cli/demo')
const { formatReport } = require('../dist/cli/format')

const { values: a, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    mode: { type: 'string', default: 'hybrid' },
    mib: { type: 'string', default: '1024' },
    writes: { type: 'string', default: '10000' },
    keys: { type: 'string', default: '100000' },
    ready: { type: 'boolean', default: false },
    prepaging: { type: 'string' },
    'ws-mib': { type: 'string', default: '128' },
    pattern: { type: 'string', default: 'sequential' },
    'free-pct': { type: 'string', default: '0' },
    'agent-nice': { type: 'string' },
  },
})
const example = positionals[0] || 'page-store'
const serviceArgs = {
  'page-store': [],
  'kv-store': a.ready ? ['--ready'] : [],
  'scan-service': ['--ws-mib', a['ws-mib'], '--pattern', a.pattern, '--free-pct', a['free-pct']],
}[example]
if (!serviceArgs) {
  console.error(`unknown example ${example}: page-store, kv-store or scan-service`)
  process.exit(2)
}
migrateExample({
  example, sizeMiB: Number(a.mib), mode: a.mode, writesPerSec: Number(a.writes), keys: Number(a.keys), serviceArgs,
  agentNice: a['agent-nice'] !== undefined ? Number(a['agent-nice']) : undefined,
  sendArgs: a.prepaging ? ['--prepaging', a.prepaging] : [],
  progress: (line) => process.stderr.write(`${line}\n`),
}).then((r) => {
  if (!r.report) {
    console.error(`migration failed: ${r.error}`)
    process.exit(1)
  }
  console.log(formatReport(r.report))
  for (const l of r.destLines) if (/^(RESULT|LAG|VERIFY)/.test(l)) console.log(`destination: ${l}`)
  if (r.client) console.log(`client: ${r.client.requests} requests, ${r.client.ok} good, ${r.client.wrong} wrong, longest gap ${r.client.maxGapMs.toFixed(1)} ms`)
  process.exit(r.ok ? 0 : 1)
})
