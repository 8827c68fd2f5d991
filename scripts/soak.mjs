#!/usr/bin/env node
// The same service moved again and again: the page-store example between two "hosts" on this machine (each its own
// runtime directory, as two machines would have), through the CLI, cycling the modes, with every Nth hop tried first
// and cancelled in its round 0 (the service runs on; the receiver waits for the next try). A checking client follows
// the service from home to home the whole time: every answer is checked against its page's version, and versions
// never go back, across every hop. After each hop the new home verifies every page, the old process has ended with 0,
// and the new home's migration threads are gone.
//
//   node scripts/soak.mjs [--hops 30] [--mib 64] [--writes 2000] [--modes hybrid,postcopy,precopy] [--cancel-every 5]
//                         [--hop-timeout-ms 120000] [--no-serve] [--back-at-once] [--netns [--rate-mbit N]]
//                         [--inject LIST] [--link-faults LIST] [--link-down MS] [--stop LIST] [--blocking] [--streams N]
//                         [--encrypt] [--lag ROLE:MS] [--signal-source] [--json FILE]
// --encrypt: every send seals its connections (send --encrypt). With link faults cued on a frame (KIND@FRAME) the
// hosts write their keys to a key log ($UFFD_MIGRATE_KEYLOG, in a temporary directory) for the relay, which then finds
// the frame inside the sealed records and breaks the link at a record's edge.
// --streams N: every send asks for N bulk connections (pre-copy pages over parallel streams; the faults above then
// also break the extra streams, and a cancel closes them).
// --lag ROLE:MS: each hop's send goes through a relay on this machine that holds what goes towards the destination on
// the connections of that role (bulk, stream, urgent, demand) for MS ms, in order: with --streams, the bulk stream
// (or the extra ones) arrives behind the others, so a frame sent on another stream than its page's would overtake the
// data it must follow and a page would be wrong at VERIFY (Relay.lagToDestination).
// --blocking: the service reads missing pages in place (its thread blocks in the fault) instead of awaiting ready();
// with it, the injection `agent-crash` (the agent crashes once the service's thread waits in a fault) applies.
// --inject LIST: each hop's receiver gets the next of these UFFD_MIGRATE_FAULT_INJECT values in turn (`none`: no
// injection), e.g. agent-crash:postcopy,agent-crash:paused,agent-crash:restore,none: its agent crashes (a bug) as a
// destination, and later as that process's next source. Every hop must still end with the service on one host: moved
// (a new agent took over), or resumed at its source, which then is tried again (the row counts it), never on none.
// --link-faults LIST: each hop's send goes through a relay on this machine that breaks the link once, the next of
// these in turn: `reset` (every connection reset both ways), `one-sided` (reset towards the source only; the
// destination's ends stay open and silent), `silent:MS` (nothing passes for MS ms, then the link is back), each at a
// random point of the hop's bytes, or `KIND@FRAME` when that frame passes (delivered just before the break) and
// `KIND@FRAME-lost` (lost with it): e.g. reset@HANDOFF-lost, reset@HANDOFF, silent:4000@SETTLED-lost, `none`; or
// `corrupt`: no break, a changed byte instead, in the header of the first PAGES frame after HANDOFF (a region index
// past the table: what TCP's checksum can miss on a plaintext link; not with --encrypt, where a record fails its tag
// instead), which both sides must take for a broken link and recover from (post-copy and hybrid hops). The
// sends get --link-timeout-ms 3000, so a silence longer than that is noticed. The same rule as --inject: the service
// ends each hop on one host, moved (after a recovery) or resumed at its source and tried again, never on none.
// (--service-host: the old home's forwarder reaches the new home's service at its own address, not the relay's.)
// --link-down MS (with --netns): the migration crosses a second veth link of its own (a migration network apart from
// the service's, so the client is not cut off), and each hop's first try takes that link down (no carrier: packets
// vanish, nobody is told) for MS ms, at a random moment in its first 400 ms (the CLI starts, then pages move: a larger --mib moves them longer): the kernel's TCP_USER_TIMEOUT and
// keepalives, connects that fail while it is down, recovery after the hand-off; --link-timeout-ms 3000.
// --stop LIST: each hop's first try stops a process (SIGSTOP, as a paused VM, a swap storm or a debugger would) at a
// random moment of its first 600 ms, for MS ms, then lets it go (SIGCONT), the next of these in turn: `dest:MS` (the
// receiving service's process, its agent with it), `source:MS` (the service's current home, its agent with it),
// `none`; with --link-timeout-ms 3000, so a longer stop is taken for a stuck peer. The same rule as --inject. Keep a
// stop of a process that has clients under 5 s: any Node HTTP server stopped for longer than its keepAliveTimeout
// (5 s) resets its keep-alive clients when it runs again (its timers run before it reads their requests; a plain
// server and client show it, no migration needed), and the client counts those resets.
// --signal-source: each hop's old home gets SIGTERM (a supervisor's stop) as soon as the service runs at the new one
// (its RESTORED line): in post-copy it holds pages the new home still lacks, so it must hold the signal until the
// migration ends, and then end as a moved guest does (0, once the clients it relays went idle); the row counts the
// hops whose old home logged the signal held.
// --back-at-once: each hop starts as soon as the last one settled, while the old home may still forward clients
// (a guest moving back to a host where its old process still runs takes the name over); the old homes' exits are
// checked at the end.
// --netns (root): host b is a network namespace joined to this one by a veth pair (tbf-shaped to N Mbit/s with
// --rate-mbit), so every hop crosses a real link; the client runs here and reaches both hosts' addresses.
// By default the service serve()s its HTTP server: its clients are held through each hand-off and relayed by the old
// home until they move on, so a refused or reset request fails the soak too. --no-serve: the service closes its
// server in pause() and the client retries at the new home (those refusals are counted, not failures).
// Each hop's line splits its time: the receiver listening, send's exit, the new home's VERIFY, and the old home's
// exit; a service that serve()s lives on as a forwarder while the client's idle keep-alive connections to it stay
// open (the new home's server closes them after its keepAliveTimeout, 5 s in Node), then for forwardIdleMs (2 s).
// The environment passes through: UFFD_MIGRATE_TRACKER=sync-wp soaks the fallback tracker. SOAK_VERBOSE=1 also prints
// each hop's receiver log and send's stderr (progress lines left out) once the new home verified.
// Prints one line per hop, then a table; exit 0 when every hop moved and checked, 1 on the first failure (with what
// both hosts said). Run `npm run build:ts` first (uses dist/).
import { randomBytes } from 'node:crypto'
import { mkdtempSync, writeFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { parseArgs } from 'node:util'
import { fileURLToPath } from 'node:url'

const root = join(dirname(fileURLToPath(import.meta.url)), '..')
const require = createRequire(import.meta.url)
const { LineProc, freePort, childrenOf, threadsOf } = require(join(root, 'dist', 'cli', 'proc.js'))
const { createHostPair, netnsUnavailable } = require(join(root, 'dist', 'testing', 'netns.js'))
const { checker } = require(join(root, 'examples', 'page-store', 'client.js'))
const { clientLoops } = require(join(root, 'examples', 'client-loops.js'))
const { Relay } = require(join(root, 'dist', 'testing', 'relay.js'))
const { MSG_NAMES } = require(join(root, 'dist', 'protocol', 'messages.js'))
const Msg = Object.fromEntries(Object.entries(MSG_NAMES).map(([type, name]) => [name, Number(type)]))

const OPTIONS = {
  hops: { type: 'string', default: '30' },
  mib: { type: 'string', default: '64' },
  writes: { type: 'string', default: '2000' },
  modes: { type: 'string', default: 'hybrid,postcopy,precopy' },
  'cancel-every': { type: 'string', default: '5' },
  'hop-timeout-ms': { type: 'string', default: '120000' },
  'no-serve': { type: 'boolean', default: false },
  netns: { type: 'boolean', default: false },
  'back-at-once': { type: 'boolean', default: false },
  inject: { type: 'string' },
  'link-faults': { type: 'string' },
  'rate-mbit': { type: 'string' },
  'link-down': { type: 'string' },
  stop: { type: 'string' },
  json: { type: 'string' },
  blocking: { type: 'boolean', default: false },
  streams: { type: 'string', default: '1' },
  encrypt: { type: 'boolean', default: false },
  lag: { type: 'string' },
  'signal-source': { type: 'boolean', default: false },
}
const parsed = (() => {
  try {
    return parseArgs({ options: OPTIONS })
  } catch (err) {
    return usage(err.message) // an unknown option: one line, exit 2
  }
})()
const a = parsed.values
const hops = Number(a.hops), mib = Number(a.mib), cancelEvery = Number(a['cancel-every']), hopTimeoutMs = Number(a['hop-timeout-ms'])
const modes = a.modes.split(',')
for (const m of modes) if (!['hybrid', 'postcopy', 'precopy'].includes(m)) usage(`bad --modes: ${m}`)
if (!(hops >= 1) || !(mib >= 1) || !(cancelEvery >= 0) || !(hopTimeoutMs > 0)) usage('--hops, --mib and --hop-timeout-ms must be positive, --cancel-every 0 or more')
const streams = Number(a.streams)
if (!(Number.isInteger(streams) && streams >= 1 && streams <= 8)) usage('--streams must be 1 to 8')
const streamArgs = [...(streams > 1 ? ['--streams', String(streams)] : []), ...(a.encrypt ? ['--encrypt'] : [])]
function usage(msg) {
  process.stderr.write(`soak: ${msg}\n`)
  process.exit(2)
}

const cli = join(root, 'bin', 'uffd-migrate.js')
const server = join(root, 'examples', 'page-store', 'server.js')
const guest = `soak-${process.pid}`
const pageCount = (mib * 1024 * 1024) / 4096
const token = randomBytes(24).toString('hex')
const say = (s) => process.stderr.write(`${s}\n`)
const procs = []
const hostEnv = (name) => ({ ...process.env, UFFD_MIGRATE_TOKEN: token, XDG_RUNTIME_DIR: mkdtempSync(join(tmpdir(), `soak-${name}-`)) })
if (a.netns && netnsUnavailable()) usage(`--netns: ${netnsUnavailable()}`)
if (a['rate-mbit'] !== undefined && !(Number(a['rate-mbit']) > 0 && a.netns)) usage('--rate-mbit needs --netns and a positive rate')
const downMs = Number(a['link-down'] ?? 0)
if (a['link-down'] !== undefined && !(downMs > 0 && a.netns && !a['link-faults'])) usage('--link-down needs --netns, a positive MS, and no --link-faults')
const pair = a.netns ? createHostPair(120 + (process.pid % 30), { migrationLink: downMs > 0 }) : undefined
if (pair && a['rate-mbit']) pair.shape(Number(a['rate-mbit']))
// each host: its runtime directory, its address, and how a command runs there
const hosts = [
  { name: 'a', env: hostEnv('a'), ip: pair?.hostIp ?? '127.0.0.1', migIp: pair?.migration?.hostIp ?? pair?.hostIp ?? '127.0.0.1', prefix: [] },
  { name: 'b', env: hostEnv('b'), ip: pair?.nsIp ?? '127.0.0.1', migIp: pair?.migration?.nsIp ?? pair?.nsIp ?? '127.0.0.1', prefix: pair ? ['ip', 'netns', 'exec', pair.ns] : [] },
]
const start = (host, args, env = {}) => {
  const [cmd, ...rest] = [...host.prefix, process.execPath, ...args]
  const p = new LineProc(cmd, rest, { env: { ...host.env, ...env } })
  procs.push(p)
  return p
}
const serve = !a['no-serve']
const injections = a.inject ? a.inject.split(',') : ['none']
const linkFaults = (a['link-faults'] ?? 'none').split(',').map(linkFault)
const lag = a.lag === undefined ? undefined : /^(urgent|bulk|demand|stream):(\d+)$/.exec(a.lag)
if (a.lag !== undefined && !lag) usage(`bad --lag: ${a.lag} (ROLE:MS, ROLE one of urgent, bulk, demand, stream)`)
if (a.encrypt && linkFaults.some((f) => f.frame) && !process.env.UFFD_MIGRATE_KEYLOG) {
  // before the hosts start: they inherit it, and so does every relay (src/testing/relay.ts)
  process.env.UFFD_MIGRATE_KEYLOG = join(mkdtempSync(join(tmpdir(), 'soak-keys-')), 'keylog')
  for (const h of hosts) h.env.UFFD_MIGRATE_KEYLOG = process.env.UFFD_MIGRATE_KEYLOG
}
const stops = (a.stop ?? 'none').split(',').map(stopEntry)
const chaos = injections.some((x) => x !== 'none') || linkFaults.some((f) => f.kind !== 'none') || downMs > 0 || stops.some((x) => x.who)
/** One --stop entry: whose process stops, for how long. */
function stopEntry(text) {
  const m = /^(?:none|(dest|source):(\d+))$/.exec(text)
  if (!m || (m[1] && !(Number(m[2]) > 0))) usage(`bad --stop entry: ${text} (dest:MS, source:MS or none)`)
  return { text, who: m[1], ms: Number(m[2] ?? 0) }
}
/** One --link-faults entry: what the break is and when it comes. */
function linkFault(text) {
  const m = /^(none|reset|one-sided|corrupt|silent:(\d+))(?:@([A-Z_]+)(-lost)?)?$/.exec(text)
  if (!m || (m[3] && Msg[m[3]] === undefined) || ((m[1] === 'none' || m[1] === 'corrupt') && m[3])) usage(`bad --link-faults entry: ${text} (reset, one-sided or silent:MS, optionally @FRAME or @FRAME-lost; corrupt; or none)`)
  if (m[1] === 'corrupt' && a.encrypt) usage('--link-faults corrupt changes a plaintext frame: not with --encrypt')
  return { text, kind: m[2] ? 'silent' : m[1], silentMs: Number(m[2] ?? 0), frame: m[3] && { type: Msg[m[3]], lose: m[4] !== undefined } }
}
/** A relay for one hop's sends that breaks the link once, as `fault` says (a random point: within the hop's bytes). */
function relayFor(fault, seed) {
  const at = fault.frame ? Infinity : Math.floor(((seed % 1000) / 1000) * 1.1 * mib * 1024 * 1024)
  const r = fault.kind === 'corrupt' ? Relay.corruptingPagesHeaders() : new Relay(fault.kind === 'none' ? Infinity : at)
  r.oneSided = fault.kind === 'one-sided'
  r.silentMs = fault.silentMs
  if (fault.frame && fault.kind !== 'none') r.onFrame = { ...fault.frame, toDestination: undefined }
  return r
}
const serviceArgs = (host, http) => [server, '--name', guest, '--mib', String(mib), '--writes', a.writes, '--http', String(http), '--http-host', host.ip, ...(serve ? ['--serve'] : []), ...(a.blocking ? ['--blocking'] : [])]

// ---- the client: follows the service's current home; wrong answers fail the soak, refused ones are counted ----
let home // the address the service answers on now: [host, port]
const stats = { requests: 0, ok: 0, wrong: 0, errors: 0, maxGapMs: 0, wrongSamples: [], errorSamples: [] }
function startClient() {
  const check = checker(stats)
  let seed = 12345
  return clientLoops({
    concurrency: 4, stats,
    async loop(_j, { agent, running }) {
      while (running()) {
        const [ip, port] = home ?? []
        seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0
        // (a failure: --no-serve, paused for the hand-off with its server closed)
        if (!port || !(await check(ip, port, seed % pageCount, agent))) await new Promise((r) => setTimeout(r, 2))
      }
    },
  })
}

// ---- one hop ----
const migrationThreads = (p) => threadsOf(childrenOf(p.child.pid)[0] ?? p.child.pid).map((t) => t.name).filter((n) => n.startsWith('uffdm-'))
async function waitFor(what, ms, cond) {
  const until = Date.now() + ms
  while (!cond()) {
    if (Date.now() > until) throw new Error(`${what} within ${ms} ms`)
    await new Promise((r) => setTimeout(r, 50))
  }
}
function fail(msg, ...ps) {
  const tail = ps.map((p) => `--- ${p.child.spawnargs.slice(1, 4).join(' ')} (exit ${p.child.exitCode ?? p.child.signalCode ?? 'running'})\n${p.stderr.slice(-2500)}`)
  throw new Error(`${msg}\n${tail.join('\n')}`)
}

async function hop(n, from, to, current) {
  const mode = modes[n % modes.length]
  const port = await freePort(), http = await freePort()
  const t0 = performance.now()
  const injection = injections[n % injections.length]
  const inject = injection !== 'none' ? { UFFD_MIGRATE_FAULT_INJECT: injection } : {}
  const dst = start(to, [cli, 'receive', '--listen', `${to.migIp}:${port}`, '--', process.execPath, ...serviceArgs(to, http)], inject)
  await dst.waitLine(/waiting for the incoming migration/, 30_000, 'stderr')
  const steps = { listen: performance.now() - t0 } // ms from the receiver's start to each step
  const step = (name) => (steps[name] = performance.now() - t0)
  const errorsBefore = stats.errors, gapBefore = stats.maxGapMs, sourceLogAt = current.stderr.length
  stats.maxGapMs = 0
  const row = { undone: [], hop: n + 1, route: `${from.name}→${to.name}`, mode, cancelled: false, injection, resumedAtSource: 0 }
  if (cancelEvery > 0 && (n + 1) % cancelEvery === 0) {
    // tried first (with pre-copy rounds, slowed down) and cancelled in round 0: the service runs on at its home, the
    // receiver keeps waiting
    const mark = dst.mark('stderr')
    const send = start(from, [cli, 'send', '--guest', guest, '--to', `${to.migIp}:${port}`, '--service-host', to.ip, '--mode', 'hybrid', '--max-bandwidth', '4MiB', '--json', ...streamArgs])
    await send.waitLine(/precopy round 0/, 30_000, 'stderr')
    const c = start(from, [cli, 'cancel', '--guest', guest])
    const [cancelled, code] = [(await c.exited).code, (await send.exited).code]
    if (cancelled === 0 && code === 3) row.cancelled = true
    // (an injected crash that ended the try before the cancel came, the receiver's or its source's (the last hop's
    // receiver): the service runs on at its home all the same)
    else if (chaos && leftAtSource(send, code)) row.resumedAtSource++
    else fail(`hop ${n + 1}: cancel exited ${cancelled}, the cancelled send ${code} (not 0 and 3)`, c, send, dst)
    await listensAgain(dst, mark)
    if (current.exitCode !== null) fail(`hop ${n + 1}: the service ended after a cancel`, current, send)
  }
  // (--link-faults: this hop's tries go through a relay that breaks the link once)
  const fault = linkFaults[n % linkFaults.length]
  const relay = a['link-faults'] || lag ? relayFor(fault, Math.imul(n + 1, 2654435761) >>> 0) : undefined
  if (relay && lag) relay.lagToDestination = { role: lag[1], ms: Number(lag[2]) }
  const target = relay ? await relay.start(to.ip, port, pair?.hostIp ?? '127.0.0.1') : `${to.migIp}:${port}`
  row.linkFault = downMs ? `down:${downMs}` : fault.text
  const stop = stops[n % stops.length]
  row.stop = stop.text
  let send
  if (a['signal-source']) void dst.waitLine(/^RESTORED$/, hopTimeoutMs).then(() => process.kill(servicePid(current), 'SIGTERM'), () => {})
  for (let tries = 0; ; tries++) {
    const mark = dst.mark('stderr')
    const faulty = relay || downMs || stop.who ? ['--link-timeout-ms', '3000'] : []
    send = start(from, [cli, 'send', '--guest', guest, '--to', target, '--service-host', to.ip, '--mode', mode, '--json', ...faulty, ...streamArgs])
    const seed = Math.imul(n + 1, 2654435761) >>> 0
    if (downMs && tries === 0) linkDown(row, seed)
    if (stop.who && tries === 0) stopFor(row, stop, stop.who === 'dest' ? dst : current, seed)
    const sent = await send.waitExit(hopTimeoutMs).catch((err) => fail(`hop ${n + 1}: ${err.message}`, send, current, dst))
    if (sent.code === 0) break
    // an injected crash may end a try before the hand-off: the service runs on at its source (never on neither host)
    const said = leftAtSource(send, sent.code)
    if (!chaos || !said || row.resumedAtSource >= 3 || current.exitCode !== null) fail(`hop ${n + 1}: send exited ${sent.code}`, send, current, dst)
    row.resumedAtSource++
    say(`hop ${n + 1}: the service resumed at its source (${said.code}: ${said.message}); trying again`)
    await Promise.all(row.undone) // (--link-down, --stop: once the link is back, the process runs again)
    await listensAgain(dst, mark)
  }
  step('sent')
  relay?.close()
  await Promise.all(row.undone)
  delete row.undone
  const report = JSON.parse(send.lines.join('\n'))
  row.linkBroke = relay ? relay.cuts > 0 || relay.corrupted > 0 : row.linkBroke === true
  await dst.waitLine(/^RESTORED$/, 30_000)
  home = [to.ip, http]
  const verify = (await dst.waitLine(/^VERIFY (.*)$/, hopTimeoutMs))[1]
  if (verify !== `ok pages=${pageCount}`) fail(`hop ${n + 1}: VERIFY ${verify}`, dst, current)
  step('verified')
  if (process.env.SOAK_VERBOSE) say(`--- receiver:\n${dst.stderr.split('\n').filter((l) => !/ sent [0-9.]+ [KMG]i?B /.test(l)).join('\n')}\n--- send:\n${send.stderr.split('\n').filter((l) => !/ sent [0-9.]+ [KMG]i?B /.test(l)).join('\n')}`)
  if (a['back-at-once']) lingering.push({ hop: n + 1, p: current })
  else await oldHomeEnded(n + 1, current).then(() => step('oldGone'))
  await waitFor(`hop ${n + 1}: the new home's migration threads did not end`, 10_000, () => migrationThreads(dst).length === 0).catch((err) => fail(err.message, dst))
  if (stats.wrong > 0) fail(`hop ${n + 1}: ${stats.wrong} wrong answer(s): ${JSON.stringify(stats.wrongSamples)}`, dst)
  if (serve && stats.errors > 0) fail(`hop ${n + 1}: the client saw ${stats.errors} refused or reset request(s) of a service that serve()s: ${JSON.stringify(stats.errorSamples)} (this hop began at ${Math.round(t0 - clientT0)} ms)`, dst, current)
  Object.assign(row, {
    totalMs: report.totalMs, downtimeMs: report.downtimeMs, rounds: report.rounds?.length ?? 0,
    sentTwice: report.pagesSentTwiceAfterHandoff ?? 0, refused: stats.errors - errorsBefore, maxGapMs: stats.maxGapMs,
    hopMs: performance.now() - t0, steps, recoveries: report.postcopy?.recoveries ?? 0,
    // agents that crashed and were taken over in this hop, on the destination and on the source (the injections)
    takeovers: [dst.stderr, current.stderr.slice(sourceLogAt)].reduce((k, log) => k + (log.match(/a new migration agent takes over/g) ?? []).length, 0),
    signalHeld: signalHeld(current.stderr.slice(sourceLogAt)),
  })
  // (read again once every old home ended: with --back-at-once its line may come after this hop's)
  Object.defineProperty(row, 'oldHomeLog', { value: () => current.stderr.slice(sourceLogAt) })
  stats.maxGapMs = Math.max(stats.maxGapMs, gapBefore)
  if (row.sentTwice !== 0) fail(`hop ${n + 1}: ${row.sentTwice} page(s) sent twice after the hand-off`, send)
  return { row, dst }
}

/** --signal-source: where the old home held its SIGTERM (in the migration, or, moved already, while it relayed its clients). */
function signalHeld(log) {
  return /SIGTERM: held until the migration/.test(log) ? 'migration' : /SIGTERM: held: the service moved/.test(log) ? 'relaying' : undefined
}

/** A fault at a random moment (seed) of the try's first windowMs: doIt(), then ms later undo(what doIt() gave); row.undone waits for the undo. */
function disrupt(row, seed, windowMs, ms, doIt, undo) {
  row.undone.push(new Promise((resolve) => setTimeout(() => {
    const done = doIt()
    setTimeout(() => resolve(undo(done)), ms)
  }, seed % windowMs)))
}

/** --link-down: the migration link goes down in the try's first 400 ms, for downMs. */
function linkDown(row, seed) {
  row.linkBroke = true
  disrupt(row, seed, 400, downMs, () => pair.migration.setLinkUp(false), () => pair.migration.setLinkUp(true))
}

/** --stop: p's service process (a receiver's child, or the first home itself) stops in the try's first 600 ms, for stop.ms. */
function stopFor(row, stop, p, seed) {
  disrupt(row, seed, 600, stop.ms, () => {
    const pid = servicePid(p)
    process.kill(pid, 'SIGSTOP')
    return pid
  }, (pid) => process.kill(pid, 'SIGCONT'))
}

/** The service's process of a home: a receiver's child, or the first home itself. */
function servicePid(p) {
  return childrenOf(p.child.pid)[0] ?? p.child.pid
}

/** send's --json answer when it exited 1 with the service running on at its source, else undefined. */
function leftAtSource(send, code) {
  const said = code === 1 ? JSON.parse(send.lines.join('\n') || '{}') : {}
  return said.serviceRunsOn === 'source' ? said : undefined
}

/**
 * The receiver (lines of its log from mark on) ended that session and waits for the next source; nothing to wait for
 * when the try never began a session there (its connections died on the way: a link fault's silence).
 */
const listensAgain = (dst, mark) => dst.errLines.slice(mark).some((l) => /a migration from .* began/.test(l))
  ? dst.waitLine(/listening for the next source|a new agent listens on .* again/, 30_000, 'stderr', mark)
  : Promise.resolve()

/** An old home ends with 0 once its clients moved on (a forwarder lives while they use it). */
async function oldHomeEnded(hop, p) {
  const old = await p.waitExit(30_000).catch((err) => fail(`hop ${hop}: the old home did not end: ${err.message}`, p))
  if (old.code !== 0) fail(`hop ${hop}: the old home exited ${old.code}`, p)
}

// ---- the run ----
const rows = []
const lingering = [] // --back-at-once: old homes not waited for yet
let current
let client, clientT0 = 0
let exit = 0
try {
  const firstHttp = await freePort()
  current = start(hosts[0], serviceArgs(hosts[0], firstHttp))
  await current.waitLine(/^READY/)
  await current.waitLine(/^HTTP /)
  home = [hosts[0].ip, firstHttp]
  clientT0 = performance.now()
  client = startClient()
  say(`soak: guest ${guest}, ${mib} MiB, ${a.writes} page writes/s, ${hops} hops (${modes.join(', ')}), ${cancelEvery ? `1 hop in ${cancelEvery} cancelled once first` : 'no hop cancelled'}${injections.some((x) => x !== 'none') ? `; receivers' agents crash in turn: ${injections.join(', ')}` : ''}${a['link-faults'] ? `; the link breaks in turn: ${a['link-faults']}` : ''}${a.stop ? `; a process stops in turn: ${a.stop}` : ''}; a checking client follows it${pair ? `; host b in namespace ${pair.ns} (${pair.nsIp})${a['rate-mbit'] ? `, the link shaped to ${a['rate-mbit']} Mbit/s` : ''}` : ''}${downMs ? `; the migration crosses its own link (${pair.migration.nsIp}), down for ${downMs} ms in each hop's first try` : ''}${serve ? ' (the service serve()s: no request may fail)' : ''}`)
  for (let n = 0; n < hops; n++) {
    const [from, to] = n % 2 === 0 ? hosts : [hosts[1], hosts[0]]
    const { row, dst } = await hop(n, from, to, current)
    rows.push(row)
    current = dst
    say(`hop ${row.hop} ${row.route} ${row.mode}${row.cancelled ? ' (after a cancel)' : ''}${row.injection !== 'none' ? ` (receiver: ${row.injection})` : ''}${row.takeovers ? `, ${row.takeovers} agent takeover(s)` : ''}${row.linkFault !== 'none' ? ` (link: ${row.linkFault}${row.linkBroke ? `, broke${row.recoveries ? `, ${row.recoveries} recovery` : ''}` : ', did not break'})` : ''}${row.stop !== 'none' ? ` (stopped: ${row.stop}${row.recoveries ? `, ${row.recoveries} recovery` : ''})` : ''}${a['signal-source'] ? ` (old home SIGTERMed, held ${row.signalHeld === 'migration' ? 'until the migration ended' : row.signalHeld === 'relaying' ? 'while it relayed' : 'by nobody'})` : ''}: total ${row.totalMs.toFixed(0)} ms, downtime ${row.downtimeMs.toFixed(1)} ms, client: ${row.refused} refused, longest gap ${row.maxGapMs.toFixed(0)} ms; verified; hop ${(row.hopMs / 1000).toFixed(1)} s (${Object.entries(row.steps).map(([k, v]) => `${k} ${(v / 1000).toFixed(1)}`).join(', ')})`)
  }
  for (const { hop, p } of lingering) await oldHomeEnded(hop, p)
  for (const r of rows) r.signalHeld = signalHeld(r.oldHomeLog())
} catch (err) {
  say(`soak: FAILED: ${err.message}`)
  exit = 1
} finally {
  const c = await client?.stop()
  for (const p of procs) p.kill()
  pair?.cleanup()
  const q = (xs, f) => {
    const s = xs.map(f).sort((x, y) => x - y)
    return s.length ? `${s[0].toFixed(1)} / ${s[Math.floor(s.length / 2)].toFixed(1)} / ${s[s.length - 1].toFixed(1)}` : '-'
  }
  const out = ['', '| mode | hops | after a cancel | tries that left it at its source | total ms (min / median / max) | downtime ms (min / median / max) | client gap ms (min / median / max) |', '|---|---|---|---|---|---|---|']
  for (const m of modes) {
    const r = rows.filter((x) => x.mode === m)
    out.push(`| ${m} | ${r.length} | ${r.filter((x) => x.cancelled).length} | ${r.reduce((k, x) => k + x.resumedAtSource, 0)} | ${q(r, (x) => x.totalMs)} | ${q(r, (x) => x.downtimeMs)} | ${q(r, (x) => x.maxGapMs)} |`)
  }
  if (a['signal-source']) out.push('', `--signal-source: the old home held its SIGTERM until the migration ended in ${rows.filter((x) => x.signalHeld === 'migration').length} of ${rows.length} hops, while it relayed its clients after the move in ${rows.filter((x) => x.signalHeld === 'relaying').length}, and every old home ended with 0`)
  out.push('', `${rows.length} of ${hops} hops moved and verified; client: ${c?.requests ?? 0} requests, ${c?.ok ?? 0} checked good, ${c?.wrong ?? 0} wrong, ${c?.errors ?? 0} refused or reset${serve ? '' : ' (--no-serve: the service closes its server in pause())'}`)
  process.stdout.write(out.join('\n') + '\n')
  if (a.json) writeFileSync(a.json, JSON.stringify({ hops, mib, writes: Number(a.writes), rows, client: c }, null, 2))
  if (!exit && (rows.length !== hops || (c?.wrong ?? 0) > 0 || (serve && (c?.errors ?? 0) > 0))) exit = 1
  process.exit(exit)
}
