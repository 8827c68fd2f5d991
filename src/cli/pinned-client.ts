/**
 * The autocannon client pinned to the source's address (ExampleRun.autocannon),
 * in a process of its own, as a client on another host would be. In the
 * process that also runs the checking client flat out, its latencies held that
 * event loop's own queueing: up to 65 ms before any migration began.
 *
 * Run as a child (fork): argv[2] = URL, argv[3] = total rate (0: flat out).
 * It says 'started' once autocannon runs, takes 'migrating' and 'stop', and
 * answers 'stop' with its PinnedClientResult.
 */
import { fork } from 'node:child_process'
import { once } from 'node:events'
import { join } from 'node:path'

export interface PinnedClientResult {
  requests2xx: number
  errors: number
  timeouts: number
  non2xx: number
  p99Ms: number
  maxMs: number
  /** Longest stretch without a 2xx answer, over all connections. */
  maxGapMs: number
  /** The longest latency of the answers that came before the migration began (the same client, same machine): the floor. */
  maxBeforeMs: number
  /** The source's forwarder, from its exit line: bytes relayed and its thread's CPU time while forwarding. */
  forwarder?: { bytes: number; cpuMs: number }
}

export interface PinnedClient {
  migrationStarts(): void
  stop(): Promise<PinnedClientResult>
  /** Ends the client process at once, result or not (idempotent). */
  kill(): void
}

/** Starts the client process; resolves once autocannon runs. */
export async function pinnedClient(url: string, overallRate?: number): Promise<PinnedClient> {
  // the compiled file, also when this module runs from src/ (the tests)
  const child = fork(join(__dirname, '..', '..', 'dist', 'cli', 'pinned-client.js'), [url, String(overallRate ?? 0)], { stdio: ['ignore', 'ignore', 'inherit', 'ipc'] })
  const exited = once(child, 'exit').then(([code, signal]) => {
    throw new Error(`pinned client exited (${signal ?? code}) before its result`)
  })
  exited.catch(() => {})
  const next = <T>(): Promise<T> => Promise.race([once(child, 'message').then(([m]) => m as T), exited])
  const started = await next<string>()
  if (started !== 'started') throw new Error(`pinned client: unexpected message ${JSON.stringify(started)}`)
  return {
    migrationStarts: () => child.send('migrating'),
    async stop() {
      child.send('stop')
      const result = await next<PinnedClientResult>()
      child.disconnect()
      return result
    },
    kill: () => {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL')
    },
  }
}

/** The child: autocannon until 'stop'; the longest stretch without a 2xx is tracked from its response events. */
function runChild(url: string, overallRate: number): void {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const autocannon = require('autocannon')
  let last = performance.now()
  let maxGapMs = 0
  // the longest latency until the migration began (then it stops growing)
  let maxBeforeMs = 0
  let migrating = false
  const instance = autocannon({ url, connections: 4, duration: 3600, timeout: 30, ...(overallRate > 0 ? { overallRate } : {}) })
  instance.on('response', (_client: unknown, status: number, _bytes: number, latencyMs: number) => {
    if (status < 200 || status >= 300) return
    if (!migrating) maxBeforeMs = Math.max(maxBeforeMs, latencyMs)
    const t = performance.now()
    maxGapMs = Math.max(maxGapMs, t - last)
    last = t
  })
  instance.once('done', (r: Record<string, any>) => {
    const result: PinnedClientResult = {
      requests2xx: r['2xx'], errors: r.errors, timeouts: r.timeouts, non2xx: r.non2xx, p99Ms: r.latency.p99, maxMs: r.latency.max, maxGapMs, maxBeforeMs,
    }
    process.send!(result)
  })
  process.on('message', (m) => {
    if (m === 'migrating') migrating = true
    else if (m === 'stop') instance.stop()
  })
  // the parent went away without a 'stop': nothing is left running
  process.on('disconnect', () => process.exit(0))
  process.send!('started')
}

if (require.main === module && process.send) runChild(process.argv[2], Number(process.argv[3]))
