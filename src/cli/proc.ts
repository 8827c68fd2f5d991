/** Child processes with line-oriented stdout and stderr, for the demo, tests and benchmarks. */
import { type ChildProcess, spawn, type SpawnOptions } from 'node:child_process'
import { readdirSync, readFileSync } from 'node:fs'
import { createServer } from 'node:net'
import type { Readable } from 'node:stream'

type Stream = 'stdout' | 'stderr'

export class LineProc {
  readonly lines: string[] = []
  readonly errLines: string[] = []
  readonly child: ChildProcess
  private waiters: { re: RegExp; stream: Stream; resolve: (m: RegExpMatchArray) => void }[] = []
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>
  stderr = ''

  constructor(cmd: string, args: string[], opts: SpawnOptions & { echo?: (line: string) => void } = {}) {
    // its own process group: kill() ends it with everything it started (`receive`'s service too)
    this.child = spawn(cmd, args, { ...opts, stdio: ['ignore', 'pipe', 'pipe'], detached: true })
    this.readLines(this.child.stdout!, 'stdout', opts.echo)
    this.readLines(this.child.stderr!, 'stderr')
    // resolved once what it wrote before it exited has been read too (its last error line), at most 1 s after the
    // exit: a process it started may hold the pipes open
    const ended = (s: Readable) => new Promise<void>((resolve) => (s.readableEnded || s.destroyed ? resolve() : s.once('end', resolve).once('close', resolve)))
    this.exited = new Promise((resolve) => this.child.once('exit', (code, signal) => {
      const done = () => (clearTimeout(timer), resolve({ code, signal }))
      const timer = setTimeout(done, 1000)
      void Promise.all([ended(this.child.stdout!), ended(this.child.stderr!)]).then(done)
    }))
  }

  private readLines(from: Readable, stream: Stream, echo?: (line: string) => void): void {
    let buf = ''
    const store = stream === 'stdout' ? this.lines : this.errLines
    from.setEncoding('utf8').on('data', (c: string) => {
      if (stream === 'stderr') {
        this.stderr += c
        if (this.stderr.length > 1 << 20) this.stderr = this.stderr.slice(-(1 << 19))
      }
      buf += c
      let nl
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl)
        buf = buf.slice(nl + 1)
        store.push(line)
        if (store.length > 10_000) store.splice(0, 5_000)
        echo?.(line)
        for (const w of [...this.waiters]) {
          const m = w.stream === stream && line.match(w.re)
          if (m) {
            this.waiters.splice(this.waiters.indexOf(w), 1)
            w.resolve(m)
          }
        }
      }
    })
  }

  get exitCode(): number | null {
    return this.child.exitCode
  }

  /** How many lines of the stream were seen so far (for waitLine's `since`: only what comes after). */
  mark(stream: Stream = 'stdout'): number {
    return (stream === 'stdout' ? this.lines : this.errLines).length
  }

  /** Resolves with the first line (seen from line `since` on, or future) of the stream matching re. */
  waitLine(re: RegExp, timeoutMs = 60_000, stream: Stream = 'stdout', since = 0): Promise<RegExpMatchArray> {
    for (const l of (stream === 'stdout' ? this.lines : this.errLines).slice(since)) {
      const m = l.match(re)
      if (m) return Promise.resolve(m)
    }
    const tail = () => this.tail()
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`timed out after ${timeoutMs} ms waiting for ${re} on ${stream} ${tail()}`)), timeoutMs)
      const w = { re, stream, resolve: (m: RegExpMatchArray) => (clearTimeout(timer), resolve(m)) }
      this.waiters.push(w)
      void this.exited.then(() => setTimeout(() => {
        if (this.waiters.includes(w)) {
          clearTimeout(timer)
          reject(new Error(`process exited while waiting for ${re} on ${stream} ${tail()}`))
        }
      }, 50))
    })
  }

  /** The exit, or an error after timeoutMs that carries the process's last output (a hang says where it hung). */
  waitExit(timeoutMs = 60_000): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
    let timer: NodeJS.Timeout | undefined
    const late = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${this.child.spawnargs.slice(1, 4).join(' ')} did not exit within ${timeoutMs} ms ${this.tail()}`)), timeoutMs)
    })
    return Promise.race([this.exited, late]).finally(() => clearTimeout(timer))
  }

  private tail(): string {
    return `(stdout: ${this.lines.slice(-5).join(' | ')}; stderr: ${this.stderr.slice(-800)})`
  }

  /** Sends a signal (default SIGKILL) to the process, or with group, to its whole process group. */
  kill(signal: NodeJS.Signals = 'SIGKILL', group = signal === 'SIGKILL'): void {
    try {
      if (group && this.child.pid) process.kill(-this.child.pid, signal)
      else if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill(signal)
    } catch {
      // already gone
    }
  }
}

/**
 * A TCP port that is free now, for a process this one is about to start.
 * Ports come from below the kernel's ephemeral range (32768+ by default): a port
 * the kernel hands out for `listen(0)` may go to any outgoing connection's local
 * end before the child binds it (EADDRINUSE, seen in CI). Each process walks its
 * own band (vitest's pool id, else its pid), so parallel test workers do not race.
 */
export async function freePort(host = '127.0.0.1'): Promise<number> {
  for (let tries = 0; tries < PORT_BAND; tries++) {
    const port = PORT_BASE + portBand * PORT_BAND + (nextPort++ % PORT_BAND)
    if (await canListen(port, host)) return port
  }
  throw new Error(`no free TCP port in ${PORT_BASE + portBand * PORT_BAND}..+${PORT_BAND} on ${host}`)
}

const PORT_BASE = 10000, PORT_BAND = 1000, PORT_BANDS = 22 // 10000..31999, below the ephemeral range
const portBand = (Number(process.env.VITEST_POOL_ID) || process.pid) % PORT_BANDS
let nextPort = process.pid % PORT_BAND // a fresh process starts elsewhere in its band than the last one

function canListen(port: number, host: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = createServer()
    s.once('error', () => resolve(false))
    s.listen({ port, host, exclusive: true }, () => s.close(() => resolve(true)))
  })
}

/**
 * Each thread of a process (Linux /proc): its name, state letter (R, S, D...) and the kernel function it sleeps in
 * (`handle_userfault` for a thread blocked in a page fault); a thread that ends meanwhile is left out.
 */
export function threadsOf(pid: number): { name: string; state: string; wait: string }[] {
  const out: { name: string; state: string; wait: string }[] = []
  for (const tid of readdirSync(`/proc/${pid}/task`)) {
    try {
      const read = (f: string) => readFileSync(`/proc/${pid}/task/${tid}/${f}`, 'utf8').trim()
      out.push({ name: read('comm'), state: read('stat').split(') ')[1]?.[0] ?? '?', wait: read('wchan') })
    } catch {
      // the thread ended between readdir and read
    }
  }
  return out
}

/** One line for a hang's diagnostics: each thread as name:state, with @kernel-wait when it sleeps in one; 'gone' if the process is. */
export function threadsLine(pid: number): string {
  try {
    return threadsOf(pid).map((t) => `${t.name}:${t.state}${t.wait && t.wait !== '0' ? `@${t.wait}` : ''}`).join(' ')
  } catch {
    return 'gone'
  }
}

/** The processes a process started (Linux /proc), in order; none if it is gone. */
export function childrenOf(pid: number): number[] {
  try {
    const kids = readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim()
    return kids ? kids.split(/\s+/).map(Number) : []
  } catch {
    return []
  }
}
