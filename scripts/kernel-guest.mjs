// Runs inside the guest that `npm run test:kernel` boots (see test-kernel.mjs):
// migrations between two processes on this kernel, under writes, every page
// verified against the service's own model, each mode once. Prints one line
// per migration and KERNEL-TEST PASS or FAIL at the end.
import { createRequire } from 'node:module'
import { release } from 'node:os'

const require = createRequire(import.meta.url)
const { migrateExample } = require('../dist/cli/demo.js')
const { runDoctor } = require('../dist/doctor.js')

const sizeMiB = Number(process.env.KERNEL_TEST_MIB ?? 64)
const pages = (sizeMiB * 2 ** 20) / 4096
const doctor = runDoctor()
console.log(`kernel ${release()}: tracker ${doctor.tracker?.kind ?? 'none'} (${doctor.tracker?.reason ?? doctor.verdict})`)
let failed = 0
for (const mode of ['hybrid', 'precopy', 'postcopy']) {
  const t0 = Date.now()
  const r = await migrateExample({ sizeMiB, mode, writesPerSec: 2000, warmupMs: 1000 })
  const rep = r.report
  const problems = []
  if (r.error) problems.push(`error: ${r.error}`)
  if (r.verify !== `ok pages=${pages}`) problems.push(`verify: ${r.verify}`)
  if (r.client && (r.client.wrong !== 0 || r.client.ok === 0)) problems.push(`client: ${JSON.stringify(r.client)}`)
  if (rep && rep.pagesSentTwiceAfterHandoff !== 0) problems.push(`pages sent twice after the hand-off: ${rep.pagesSentTwiceAfterHandoff}`)
  if (rep && rep.tracker?.kind !== doctor.tracker?.kind) problems.push(`tracker ${rep.tracker?.kind}, doctor said ${doctor.tracker?.kind}`)
  if (problems.length) failed++
  console.log(
    `${mode.padEnd(8)} ${sizeMiB} MiB, 2000 writes/s: ${problems.length ? 'FAIL ' + problems.join('; ') : `ok, ${r.verify}`}` +
      (rep ? `; tracker ${rep.tracker?.kind} (${rep.tracker?.faults ?? 0} write faults), ${rep.rounds.length} rounds, downtime ${rep.downtimeMs.toFixed(1)} ms, total ${rep.totalMs.toFixed(0)} ms` : '') +
      (r.client ? `; client ${r.client.ok} ok, ${r.client.wrong} wrong, ${r.client.errors} errors` : '') +
      ` (${((Date.now() - t0) / 1000).toFixed(1)} s wall)`,
  )
}
console.log(failed ? `KERNEL-TEST FAIL (${failed} of 3 migrations)` : 'KERNEL-TEST PASS')
process.exit(failed ? 1 : 0)
