/** Child processes with line-oriented stdout, for the demo, tests and benchmarks. */
import { type ChildProcess, spawn, type SpawnOptions } from 'node:child_process'
import { createServer } from 'node:net'

export class LineProc {
  readonly lines: string[] = []
  readonly child: ChildProcess
  private waiters: { re: RegExp; resolve: (m: RegExpMatchArray) => void }[] = []
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>
  stderr = ''

  constructor(cmd: string, args: string[], opts: SpawnOptions & { echo?: (line: string) => void } = {}) {
    this.child = spawn(cmd, args, { ...opts, stdio: ['ignore', 'pipe', 'pipe'] })
    let buf = ''
    this.child.stdout!.setEncoding('utf8').on('data', (c: string) => {
      buf += c
      let nl
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl)
        buf = buf.slice(nl + 1)
        this.lines.push(line)
        opts.echo?.(line)
        for (const w of [...this.waiters]) {
          const m = line.match(w.re)
          if (m) {
            this.waiters.splice(this.waiters.indexOf(w), 1)
            w.resolve(m)
          }
        }
      }
    })
    this.child.stderr!.setEncoding('utf8').on('data', (c: string) => {
      this.stderr += c
      if (this.stderr.length > 1 << 20) this.stderr = this.stderr.slice(-(1 << 19))
    })
    this.exited = new Promise((resolve) => this.child.once('exit', (code, signal) => resolve({ code, signal })))
  }

  /** Resolves with the first line (seen or future) matching re. */
  waitLine(re: RegExp, timeoutMs = 60_000): Promise<RegExpMatchArray> {
    for (const l of this.lines) {
      const m = l.match(re)
      if (m) return Promise.resolve(m)
    }
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`timed out after ${timeoutMs} ms waiting for ${re} (stdout: ${this.lines.slice(-5).join(' | ')}; stderr: ${this.stderr.slice(-500)})`)), timeoutMs)
      const w = { re, resolve: (m: RegExpMatchArray) => (clearTimeout(timer), resolve(m)) }
      this.waiters.push(w)
      void this.exited.then(() => setTimeout(() => {
        if (this.waiters.includes(w)) {
          clearTimeout(timer)
          reject(new Error(`process exited while waiting for ${re} (stdout: ${this.lines.slice(-5).join(' | ')}; stderr: ${this.stderr.slice(-800)})`))
        }
      }, 50))
    })
  }

  kill(): void {
    if (this.child.exitCode === null) this.child.kill('SIGKILL')
  }
}

export function freePort(host = '127.0.0.1'): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer()
    s.once('error', reject)
    s.listen(0, host, () => {
      const a = s.address()
      s.close(() => resolve(typeof a === 'object' && a ? a.port : 0))
    })
  })
}
