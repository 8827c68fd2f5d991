#!/usr/bin/env node
/**
 * uffd-migrate: doctor | receive | send | status | demo
 */
import { spawn, spawnSync } from 'node:child_process'
import { constants as osConstants } from 'node:os'
import { Command, InvalidArgumentError, Option } from 'commander'
import { formatDoctor, runDoctor } from '../doctor'
import { controlDir, controlRequest, controlSocketPath, type ControlRequest, listGuests, type MovedStatus } from '../control'
import { type MigrateOptions, MIGRATION_MODES, readTokenFile, resolveAgentNice, validateBandwidth } from '../options'
import { PREPAGING_STRATEGIES } from '../agent/prepaging'
import { resolvePostcopyNice } from '../agent/yielding'
import { ErrorCode } from '../errors'
import { formatPreflight, formatReport, movedLines, movedSummary, progressLine, ProgressPrinter } from './format'
import type { Progress } from '../agent/source/index'
import { parseAddress } from '../agent/address'
import type { MigrationReport } from '../agent/report'
import type { PreflightReport } from '../agent/source/preflight'
import { SourcePhase } from '../agent/source/machine'
import type { BandwidthLimits } from '../agent/source/bandwidth'
import { bytes, limitsText, parseRate } from '../units'

/** A source's phases while its migration runs (status shows its progress then, not the figures of one that ended). */
const MIGRATING_PHASES = new Set<string>([SourcePhase.CONNECT, SourcePhase.PRECOPY, SourcePhase.HANDOFF, SourcePhase.POSTCOPY, SourcePhase.RECOVERING])
const program = new Command()
program.name('uffd-migrate').description('Live migration of a running Node.js service between Linux hosts, with userfaultfd')
// A usage error exits 2 (commander has printed it): 1 means "failed before the hand-off, the service runs on here"
// to a script. Set before the commands, which inherit it.
program.exitOverride((err) => process.exit(err.exitCode === 0 ? 0 : 2))
// `uffd-migrate status | head -1`: a reader that stops early is not an error (no stack trace)
process.stdout.on('error', (err: NodeJS.ErrnoException) => (err.code === 'EPIPE' ? process.exit(process.exitCode ?? 0) : Promise.reject(err)))

function fail(code: string, message: string, exit = 1): never {
  process.stderr.write(`uffd-migrate: ${message} [${code}]\n`)
  process.exit(exit)
}

function positiveNumber(v: string): number {
  const n = Number(v)
  if (!(n > 0)) throw new InvalidArgumentError('expected a positive number')
  return n
}

function nonNegativeNumber(v: string): number {
  const n = Number(v)
  if (!(n >= 0)) throw new InvalidArgumentError('expected a number >= 0')
  return n
}

/** A nice value flag: the library's check, as commander's error. */
const niceFlag = (resolve: (v: string, name: string) => number, name: string) => (v: string): number => {
  try {
    return resolve(v, name)
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message)
  }
}
const agentNice = niceFlag(resolveAgentNice, '--agent-nice')

/** A bandwidth flag: '100MiB', '800Mbit', 'unlimited' ... as bytes a second, checked as the library checks it. */
function rate(v: string): number {
  const n = parseRate(v)
  if (n === undefined) throw new InvalidArgumentError("expected a rate such as 100MiB, 50MB, 800Mbit, 10Gbit or 'unlimited' (per second)")
  try {
    return validateBandwidth(n, 'the rate')
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message)
  }
}

function address(v: string): string {
  try {
    parseAddress(v)
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message)
  }
  return v
}

program
  .command('doctor')
  .description('check that this machine can migrate (kernel, userfaultfd features, permissions)')
  .option('--json', 'print the result as JSON')
  .action((o: { json?: boolean }) => {
    const r = runDoctor()
    process.stdout.write((o.json ? JSON.stringify(r, null, 2) : formatDoctor(r)) + '\n')
    process.exitCode = r.ok ? 0 : 1
  })

program
  .command('receive')
  .description('run CMD as the destination of an incoming migration')
  .requiredOption('--listen <addr>', 'address to listen on, e.g. 0.0.0.0:7070', address)
  .option('--token-file <file>', 'file holding the shared token (default: $UFFD_MIGRATE_TOKEN)')
  .option('--agent-nice <n>', "nice value 0-19 of the service's migration agent (sets $UFFD_MIGRATE_AGENT_NICE)", agentNice)
  .option('--encrypt', 'take only encrypted migrations: every connection sealed, whatever the source asks (sets $UFFD_MIGRATE_ENCRYPT=1, so the service\'s own migrations onwards are encrypted too)')
  .argument('<cmd...>', 'the service command, after --')
  .action((cmd: string[], o: { listen: string; tokenFile?: string; agentNice?: number; encrypt?: boolean }) => {
    const env: NodeJS.ProcessEnv = { ...process.env, UFFD_MIGRATE_RECEIVE: o.listen }
    if (o.encrypt) env.UFFD_MIGRATE_ENCRYPT = '1'
    if (o.agentNice !== undefined) env.UFFD_MIGRATE_AGENT_NICE = String(o.agentNice)
    if (o.tokenFile) env.UFFD_MIGRATE_TOKEN = readTokenFile(o.tokenFile)
    if (!env.UFFD_MIGRATE_TOKEN && !env.UFFD_MIGRATE_TOKEN_FILE) fail(ErrorCode.AUTH, 'no token: pass --token-file FILE or set UFFD_MIGRATE_TOKEN (the same on both hosts)')
    const child = spawn(cmd[0], cmd.slice(1), { stdio: 'inherit', env })
    for (const sig of ['SIGINT', 'SIGTERM'] as const) process.on(sig, () => child.kill(sig))
    child.on('error', (err) => fail(ErrorCode.INVALID_ARG, `cannot start ${cmd[0]}: ${err.message}`))
    // the child's status passes through: its code, or 128 + the signal that ended it (as a shell reports it)
    child.on('exit', (code, signal) => process.exit(code ?? (signal ? 128 + (osConstants.signals[signal] ?? 0) : 1)))
  })

function control(name: string, req: ControlRequest, onLine: (m: Record<string, unknown>) => void, quietMs = 0): Promise<void> {
  const path = controlSocketPath(name)
  return controlRequest(path, req, onLine, quietMs).catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ETIMEDOUT') {
      throw Object.assign(new Error(`guest '${name}' did not answer within ${quietMs / 1000} s: its main thread is busy or blocked (on a destination, waiting for a page: its log says why)`), { code: ErrorCode.GENERIC })
    }
    throw Object.assign(new Error(`no guest named '${name}' is running here (${path}: ${err.code}); start the service with Guest.start({ name: '${name}', ... })`), { code: ErrorCode.NO_GUEST })
  })
}

/** send --dry-run: a preflight (guest.preflight()); what both sides found, exit 0; or what the migration would meet, exit 1. */
async function dryRun(guest: string, options: MigrateOptions, json: boolean): Promise<never> {
  let answer: Record<string, unknown> | undefined
  try {
    await control(guest, { cmd: 'preflight', options }, (m) => (answer = m))
  } catch (err) {
    fail((err as { code?: string }).code ?? ErrorCode.NO_GUEST, (err as Error).message)
  }
  if (answer?.type !== 'preflight') {
    const code = String(answer?.code ?? ErrorCode.GENERIC), message = String(answer?.message ?? 'no answer from the guest')
    const migration = typeof answer?.migration === 'string' ? answer.migration : undefined
    if (json) process.stdout.write(JSON.stringify({ outcome: 'failed', dryRun: true, code, message, exitCode: SEND_EXIT.FAILED, serviceRunsOn: 'source', ...(migration ? { migration } : {}) }, null, 2) + '\n')
    fail(code, `dry run: ${message}${migration ? ` (migration ${migration}: the destination's log names it if the check got there)` : ''}`)
  }
  const report = answer.report as PreflightReport
  process.stdout.write((json ? JSON.stringify({ outcome: 'ok', dryRun: true, ...report }, null, 2) : formatPreflight(report)) + '\n')
  process.exit(0)
}

/** How long `status` waits for a guest's answer: one whose main thread is blocked must not hang the operator's shell. */
const STATUS_WAIT_MS = 5000

/** Exit codes of `uffd-migrate send` (README, CLI). */
export const SEND_EXIT = {
  /** The service moved and the destination settled. */
  MOVED: 0,
  /** The migration failed before the hand-off: the service runs on at the source. */
  FAILED: 1,
  /** Cancelled before the hand-off (cancel, Ctrl-C, SIGTERM): the service runs on at the source. */
  CANCELLED: 3,
  /** Failed after the hand-off: the service ran on the destination, which did not settle. */
  FAILED_AFTER_HANDOFF: 4,
  /** Moved, but the --on-moved command failed. */
  HOOK_FAILED: 5,
} as const

program
  .command('send')
  .description('migrate a running guest to a destination started with `uffd-migrate receive`')
  .requiredOption('--guest <name>', 'the guest name given to Guest.start()')
  .requiredOption('--to <addr>', 'destination host:port', address)
  .addOption(new Option('--mode <mode>', 'migration mode').choices(MIGRATION_MODES).default('hybrid'))
  .option('--downtime-ms <ms>', 'downtime budget for convergence', positiveNumber, 50)
  .option('--max-rounds <n>', 'pre-copy round limit', positiveNumber, 5)
  .option('--streams <n>', 'parallel bulk connections for the pre-copy rounds, each with a thread per side (1-8; default 1)', positiveNumber)
  .option('--max-bandwidth <rate>', 'the pre-copy rounds send at most this much a second, all streams together (e.g. 200MiB, 1Gbit; default: no limit); the hand-off never waits for it', rate)
  .option('--max-postcopy-bandwidth <rate>', 'the post-copy push sends at most this much a second (default: no limit); pages a fault waits for never wait for it', rate)
  .option('--switchover-bandwidth <rate>', 'what the link gives the hand-off, for pre-copy\'s convergence check only (with --max-bandwidth the rounds measure the limit; default: the measured rate); limits nothing', rate)
  .option('--postcopy-nice <n>', "nice value 0-19 of the agents' threads on both hosts from the hand-off (default $UFFD_MIGRATE_POSTCOPY_NICE or 10; 0: unchanged)", niceFlag(resolvePostcopyNice, '--postcopy-nice'))
  .addOption(new Option('--prepaging <strategy>', 'post-copy push strategy').choices(PREPAGING_STRATEGIES))
  .option('--pivots <k>', "post-copy: recent faults the 'bubble' push works around (default 7)", positiveNumber)
  .option('--idle-fill-ms <ms>', "post-copy, 'demand': push the rest once the service went this long without a fault (default 1000)", nonNegativeNumber)
  .option('--connect-timeout-ms <ms>', 'how long to keep dialling a destination that is not listening yet', positiveNumber, 5000)
  .option('--recovery-timeout-ms <ms>', 'post-copy: how long to keep reconnecting after the link broke (0: fail at once)', nonNegativeNumber, 60000)
  .option('--link-timeout-ms <ms>', 'a connection whose peer stops answering fails after this long (0: never)', nonNegativeNumber, 10000)
  .addOption(new Option('--on-destination-lost <what>', "after the hand-off, a destination that failed or stayed unreachable past --recovery-timeout-ms: 'fail' ends the service (exit 4), 'resume' has it resume here with its state as of the hand-off, losing what it did there since").choices(['fail', 'resume']).default('fail'))
  .option('--request-timeout-ms <ms>', 'post-copy: the destination takes a page request unanswered this long for a stuck source and recovers', positiveNumber, 5000)
  .option('--token-file <file>', 'file holding the shared token (default: the guest\'s)')
  .option('--json', 'print the report as JSON')
  .option('--quiet', 'no progress lines on stderr')
  .option('--service-host <host>', "where this host's forwarder reaches the service at the destination (default: the host of --to; for a migration network apart from the service's, or a proxy)")
  .option('--on-moved <cmd>', 'once moved, run this shell command (e.g. move a floating IP; $UFFD_MIGRATE_GUEST, $UFFD_MIGRATE_TO are set); its failure is exit 5')
  .option('--encrypt', 'seal every connection (AES-256-GCM over X25519, keys bound to the token): page contents and state secret and tamper-evident on the way; costs CPU on both hosts (~0.3 s a GiB each here). Default: the guest\'s $UFFD_MIGRATE_ENCRYPT')
  .option('--dry-run', 'check that the migration would start now (destination reached and authenticated, region table, its memory) and move nothing: exit 0 or 1')
  .action(async (o: { dryRun?: boolean; guest: string; to: string; mode: string; downtimeMs: number; maxRounds: number; streams?: number; maxBandwidth?: number; maxPostcopyBandwidth?: number; switchoverBandwidth?: number; postcopyNice?: number; connectTimeoutMs: number; recoveryTimeoutMs: number; linkTimeoutMs: number; requestTimeoutMs: number; prepaging?: string; pivots?: number; idleFillMs?: number; tokenFile?: string; json?: boolean; quiet?: boolean; onMoved?: string; serviceHost?: string; encrypt?: boolean; onDestinationLost: 'fail' | 'resume' }) => {
    const progress = new ProgressPrinter(process.stderr, !!o.quiet, !!process.stderr.isTTY)
    let report: MigrationReport | undefined
    let lastPhase: string | undefined
    let error: { code: string; message: string; afterHandoff?: boolean; runsOn?: 'unknown'; migration?: string } | undefined
    // Ctrl-C / SIGTERM: cancel (before the hand-off); a second one leaves at once, the migration goes on
    let signals = 0
    const onSignal = (sig: NodeJS.Signals) => {
      if (++signals > 1) {
        progress.clear()
        process.stderr.write(`uffd-migrate: ${sig} again: leaving; the migration goes on in guest '${o.guest}' (\`uffd-migrate status --guest ${o.guest}\`)\n`)
        process.exit(128 + (osConstants.signals[sig] ?? 1))
      }
      progress.clear()
      process.stderr.write(`uffd-migrate: ${sig}: cancelling the migration of guest '${o.guest}' ...\n`)
      control(o.guest, { cmd: 'cancel' }, (m) => {
        if (m.type === 'error') process.stderr.write(`uffd-migrate: ${m.message} [${m.code}]\n`)
      }).catch((err) => process.stderr.write(`uffd-migrate: could not cancel: ${(err as Error).message}\n`))
    }
    const options: MigrateOptions = {
          to: o.to, mode: o.mode as MigrationReport['mode'], downtimeMs: o.downtimeMs, maxRounds: o.maxRounds, connectTimeoutMs: o.connectTimeoutMs,
          recoveryTimeoutMs: o.recoveryTimeoutMs, linkTimeoutMs: o.linkTimeoutMs, requestTimeoutMs: o.requestTimeoutMs, onDestinationLost: o.onDestinationLost,
          ...(o.streams !== undefined ? { streams: o.streams } : {}),
          ...(o.maxBandwidth !== undefined ? { maxBandwidth: o.maxBandwidth } : {}),
          ...(o.maxPostcopyBandwidth !== undefined ? { maxPostcopyBandwidth: o.maxPostcopyBandwidth } : {}),
          ...(o.switchoverBandwidth !== undefined ? { switchoverBandwidth: o.switchoverBandwidth } : {}),
          ...(o.postcopyNice !== undefined ? { postcopyNice: o.postcopyNice } : {}),
          ...(o.prepaging || o.pivots || o.idleFillMs !== undefined
            ? { prepaging: { ...(o.prepaging ? { strategy: o.prepaging as never } : {}), ...(o.pivots ? { pivots: o.pivots } : {}), ...(o.idleFillMs !== undefined ? { idleFillMs: o.idleFillMs } : {}) } }
            : {}),
          ...(o.tokenFile ? { token: readTokenFile(o.tokenFile) } : {}),
          ...(o.serviceHost !== undefined ? { serviceHost: o.serviceHost } : {}),
          ...(o.encrypt ? { encrypt: true } : {}),
    }
    if (o.dryRun) return dryRun(o.guest, options, !!o.json)
    process.on('SIGINT', onSignal)
    process.on('SIGTERM', onSignal)
    try {
      await control(o.guest, { cmd: 'migrate', options }, (m) => {
        if (m.type === 'progress') {
          progress.update(m.progress as Progress)
          lastPhase = (m.progress as Progress).phase
        }
        if (m.type === 'report') report = m.report as MigrationReport
        if (m.type === 'error') error = m as never
      })
    } catch (err) {
      fail((err as { code?: string }).code ?? ErrorCode.NO_GUEST, (err as Error).message)
    }
    progress.clear()
    /** A failure on stderr, and with --json on stdout too, saying where the service runs now (for scripts). */
    function failed(code: string, message: string, exit: number, runsOn: 'source' | 'destination' | 'none' | 'unknown'): never {
      if (o.json) process.stdout.write(JSON.stringify({ outcome: 'failed', code, message, exitCode: exit, serviceRunsOn: runsOn, ...(error?.migration ? { migration: error.migration } : {}) }, null, 2) + '\n')
      return fail(code, message, exit)
    }
    if (error?.code === ErrorCode.CANCELLED) {
      process.stdout.write(o.json ? JSON.stringify({ outcome: 'cancelled', code: error.code, message: error.message, exitCode: SEND_EXIT.CANCELLED, serviceRunsOn: 'source', ...(error.migration ? { migration: error.migration } : {}) }, null, 2) + '\n' : `cancelled: ${error.message}\n`)
      process.exit(SEND_EXIT.CANCELLED)
    }
    // (exit 4 too when nobody can tell: so that nobody starts the service here again before looking there)
    if (error?.runsOn === 'unknown') failed(error.code, error.message, SEND_EXIT.FAILED_AFTER_HANDOFF, 'unknown')
    if (error && error.afterHandoff) failed(error.code, error.message, SEND_EXIT.FAILED_AFTER_HANDOFF, 'destination')
    if (error) failed(error.code, error.message, SEND_EXIT.FAILED, 'source')
    if (!report) {
      // the source process went away (killed, crashed) in the middle: say what that means for the service
      const lacking = 'the service runs on the destination, which cannot get the pages it still lacks (it fails after its recovery timeout)'
      if (lastPhase === 'postcopy' || lastPhase === 'recovering') {
        failed(ErrorCode.CONNECTION, `the guest's process ended during ${lastPhase}, after the hand-off: ${lacking}`, SEND_EXIT.FAILED_AFTER_HANDOFF, 'destination')
      }
      // in the hand-off this side cannot know whether HANDOFF left before the process ended (it commits as it goes on
      // the wire, before any progress says so): exit 4, so that nobody starts the service here again before looking
      if (lastPhase === 'handoff') {
        failed(ErrorCode.CONNECTION, `the guest's process ended during the hand-off: whether HANDOFF reached the destination is not known here. ` +
          `Ask there (uffd-migrate status --guest ${o.guest} on ${o.to.replace(/:\d+$/, '')}): 'listening' (or 'precopy' until it notices this side is gone) means it never got it and the service ended with this process; otherwise ${lacking}`,
        SEND_EXIT.FAILED_AFTER_HANDOFF, 'unknown')
      }
      if (lastPhase !== 'settled') failed(ErrorCode.CONNECTION, `the guest's process ended during ${lastPhase ?? 'connect'}, before the hand-off: the service ended with it; the destination listens again`, SEND_EXIT.FAILED, 'none')
      // (the destination had every page: moved; only the report went with the process)
      process.stderr.write(`uffd-migrate: the guest's process ended as the migration settled, before its report came: the service runs on ${o.to} with every page\n`)
    }
    if (report) process.stdout.write((o.json ? JSON.stringify(report, null, 2) : formatReport(report)) + '\n')
    else if (o.json) process.stdout.write(JSON.stringify({ outcome: 'moved', exitCode: SEND_EXIT.MOVED, serviceRunsOn: 'destination', report: null }, null, 2) + '\n')
    if (o.onMoved) {
      // the patterns that move an address for good: a floating IP, DNS, a load balancer's API
      const hook = spawnSync('/bin/sh', ['-c', o.onMoved], { stdio: ['ignore', 'inherit', 'inherit'], env: { ...process.env, UFFD_MIGRATE_GUEST: o.guest, UFFD_MIGRATE_TO: o.to } })
      if (hook.status !== 0) fail(ErrorCode.GENERIC, `--on-moved command failed (${hook.status ?? hook.signal}): ${o.onMoved}; the service runs on ${o.to}`, SEND_EXIT.HOOK_FAILED)
    }
    process.exit(SEND_EXIT.MOVED)
  })

program
  .command('cancel')
  .description('cancel a running migration before its hand-off: the service runs on here, the destination listens again')
  .requiredOption('--guest <name>', 'the guest name')
  .action(async (o: { guest: string }) => {
    let result: Record<string, unknown> | undefined
    try {
      await control(o.guest, { cmd: 'cancel' }, (m) => (result = m))
    } catch (err) {
      fail(ErrorCode.NO_GUEST, (err as Error).message)
    }
    if (result?.type !== 'cancelled') fail(String(result?.code ?? ErrorCode.GENERIC), String(result?.message ?? 'no answer from the guest'))
    process.stdout.write(`cancelled: the migration of guest '${o.guest}' stopped before the hand-off; the service runs on here\n`)
  })

program
  .command('set-bandwidth')
  .description("change a running migration's bandwidth limits at once (either or both; 'unlimited' lifts one)")
  .requiredOption('--guest <name>', 'the guest name')
  .option('--max-bandwidth <rate>', 'the pre-copy rounds, all streams together (e.g. 200MiB, 1Gbit, unlimited)', rate)
  .option('--max-postcopy-bandwidth <rate>', 'the post-copy push', rate)
  .action(async (o: { guest: string; maxBandwidth?: number; maxPostcopyBandwidth?: number }) => {
    if (o.maxBandwidth === undefined && o.maxPostcopyBandwidth === undefined) fail(ErrorCode.INVALID_ARG, 'expected --max-bandwidth or --max-postcopy-bandwidth (or both)', 2)
    let result: Record<string, unknown> | undefined
    try {
      await control(o.guest, { cmd: 'setBandwidth', limits: { maxBandwidth: o.maxBandwidth, maxPostcopyBandwidth: o.maxPostcopyBandwidth } }, (m) => (result = m))
    } catch (err) {
      fail(ErrorCode.NO_GUEST, (err as Error).message)
    }
    if (result?.type !== 'bandwidth') fail(String(result?.code ?? ErrorCode.GENERIC), String(result?.message ?? 'no answer from the guest'))
    const l = result.limits as BandwidthLimits
    process.stdout.write(`bandwidth of guest '${o.guest}': ${limitsText(l)}\n`)
  })

program
  .command('list')
  .description('list the guests on this host (their control sockets), each with its phase')
  .option('--json', 'print as JSON')
  .action(async (o: { json?: boolean }) => {
    const guests = await listGuests()
    if (o.json) return void process.stdout.write(JSON.stringify(guests, null, 2) + '\n')
    if (!guests.length) return void process.stdout.write(`no guests here (${controlDir()} holds no control socket)\n`)
    const rows = guests.map((g) => {
      const st = g.status ?? {}
      const size = ((st.regions ?? []) as { sizeBytes: number }[]).reduce((n, r) => n + r.sizeBytes, 0)
      const what = g.state === 'stale' ? 'stale: no process (its next Guest.start replaces it)' : g.state === 'busy' ? 'no answer within 2 s (its thread is busy or blocked)' : String(st.phase)
      const detail = st.progress && MIGRATING_PHASES.has(st.phase as string) ? progressLine(st.progress as Progress) : st.moved ? movedSummary(st.moved as MovedStatus) : st.lastError ? `last: ${(st.lastError as { message: string }).message}` : ''
      return [g.name, st.pid === undefined ? '-' : String(st.pid), what, size ? bytes(size) : '-', detail]
    })
    const widths = [0, 1, 2, 3].map((i) => Math.max(...rows.map((r) => r[i].length), ['NAME', 'PID', 'PHASE', 'MEMORY'][i].length))
    for (const r of [['NAME', 'PID', 'PHASE', 'MEMORY', ''], ...rows]) process.stdout.write(`${r.slice(0, 4).map((c, i) => c.padEnd(widths[i])).join('  ')}  ${r[4]}`.trimEnd() + '\n')
  })

program
  .command('status')
  .description('show a running guest\'s phase and progress')
  .requiredOption('--guest <name>', 'the guest name')
  .option('--json', 'print as JSON')
  .action(async (o: { guest: string; json?: boolean }) => {
    try {
      await control(o.guest, { cmd: 'status' }, (m) => {
        if (o.json) return void process.stdout.write(JSON.stringify(m, null, 2) + '\n')
        const list = m.regions as { name: string; sizeBytes: number; pagesLeft?: number }[]
        const regions = list.map((r) => `${r.name}=${r.sizeBytes}`).join(', ')
        process.stdout.write(`guest ${m.name} (pid ${m.pid}): ${m.phase}${m.restored ? ', restored' : ''}; regions ${regions}\n`)
        if (m.from) process.stdout.write(`  incoming migration from ${m.from} (before its hand-off: the service runs there)\n`)
        if (m.moved) for (const line of movedLines(m.moved as MovedStatus)) process.stdout.write(`  ${line}\n`)
        // a destination still receiving its memory (post-copy)
        const left = list.reduce((n, r) => n + (r.pagesLeft ?? 0), 0)
        if (left) process.stdout.write(`  ${left} page(s) still to come here from the source (post-copy)\n`)
        if (m.brokenBy) process.stdout.write(`  ${m.brokenBy}\n`) // (a destination recovering: why, and for how long it waits)
        if (m.signalHeld) process.stdout.write(`  ${m.signalHeld} held: this process ends once the migration does (send it again to end it now)\n`)
        const last = m.lastError as { code: string; message: string } | undefined
        if (last) process.stdout.write(`  last migration: ${last.message} [${last.code}]\n`)
        // the figures of a migration that ended (cancelled, failed, moved) are not news: lastError or phase says how it ended
        if (m.progress && MIGRATING_PHASES.has(m.phase as string)) process.stdout.write(`  ${progressLine(m.progress as never)}\n`)
        if (m.tracker) process.stdout.write(`  tracker ${m.tracker}\n`)
        const refusals = Object.entries((m.refusals ?? {}) as Record<string, number>)
        if (refusals.length) process.stdout.write(`  refused connections: ${refusals.map(([c, n]) => `${c} ${n}`).join(', ')}\n`)
        // (the id both hosts' log lines about it carry)
        if (m.migration) process.stdout.write(`  migration id ${m.migration} (${MIGRATING_PHASES.has(m.phase as string) || m.phase === 'settling' || m.from ? 'running' : 'the last one'})\n`)
      }, STATUS_WAIT_MS)
    } catch (err) {
      fail((err as { code?: string }).code ?? ErrorCode.NO_GUEST, (err as Error).message)
    }
  })

program
  .command('demo')
  .description('migrate an example service with a 1 GiB guest on loopback, under load, and check every answer and page')
  .option('--size-mib <n>', 'guest size in MiB', positiveNumber, 1024)
  .addOption(new Option('--mode <mode>').choices(MIGRATION_MODES).default('hybrid'))
  .option('--json', 'print the report as JSON')
  .action(async (o: { sizeMib: number; mode: string; json?: boolean }) => {
    const { runDemo } = await import('./demo')
    process.exitCode = await runDemo({ sizeMiB: o.sizeMib, mode: o.mode as never, json: !!o.json })
  })

program.parseAsync().catch((err) => fail(err.code ?? ErrorCode.GENERIC, err.message))
