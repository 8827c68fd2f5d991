/**
 * `npm run fuzz -- --frames 100000 --seed N [--wire memory|tcp] [--side destination|source] [--json]`:
 * the structure-aware fuzzer against the real addon (the destination's engine:
 * session.ts; the source's: source-session.ts; the wire: wire.ts). Prints the
 * outcome table; exits 1 on any crash, hang, wrong page, rejection without an
 * ERR_ code, or (the source side) a service run twice or nowhere, or a stray
 * page sent.
 */
import { loadBinding } from '../../binding'
import { FUZZ_SIDES, type FuzzSide, failureCount, fuzzTable, runFuzz } from './run'
import { WIRE_KINDS, type WireKind } from './wire'

async function main(): Promise<void> {
  const args = process.argv.slice(2)
  const arg = (name: string, fallback: number) => {
    const i = args.indexOf(`--${name}`)
    const v = i >= 0 ? Number(args[i + 1]) : fallback
    if (!Number.isInteger(v) || v < 0) throw new Error(`expected --${name} to be a whole number, got ${args[i + 1]}`)
    return v
  }
  const frames = arg('frames', 100_000)
  const seed = arg('seed', 1)
  const w = args.indexOf('--wire')
  const wire = (w >= 0 ? args[w + 1] : 'memory') as WireKind
  if (!WIRE_KINDS.includes(wire)) throw new Error(`expected --wire to be ${WIRE_KINDS.join(' or ')}, got ${args[w + 1]}`)
  const s = args.indexOf('--side')
  const side = (s >= 0 ? args[s + 1] : 'destination') as FuzzSide
  if (!FUZZ_SIDES.includes(side)) throw new Error(`expected --side to be ${FUZZ_SIDES.join(' or ')}, got ${args[s + 1]}`)
  let crashes = 0
  process.on('uncaughtException', (err) => {
    crashes++
    console.error(`uncaught: ${err.stack ?? err}`)
  })
  process.on('unhandledRejection', (err) => {
    crashes++
    console.error(`unhandled rejection: ${(err as Error).stack ?? err}`)
  })
  const report = await runFuzz({
    binding: loadBinding(),
    frames,
    seed,
    wire,
    side,
    onProgress: (r) => process.stderr.write(`fuzz: ${r.frames}/${frames} frames, ${r.sessions} sessions\n`),
  })
  report.totals.crashes += crashes
  console.log(args.includes('--json') ? JSON.stringify(report, null, 2) : fuzzTable(report))
  // (at once: a session that hung may still hold timers and connections)
  process.exit(failureCount(report.totals) > 0 ? 1 : 0)
}

main().catch((err) => {
  console.error(err)
  process.exitCode = 2
})
