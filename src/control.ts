/**
 * The guest's control socket: a Unix socket named after the guest, through
 * which `uffd-migrate send` and `status` drive it. One JSON object per line.
 */
import { mkdirSync, unlinkSync, existsSync } from 'node:fs'
import { connect, createServer, type Server, type Socket } from 'node:net'
import { join } from 'node:path'
import type { Progress } from './agent/source/index'
import type { MigrationReport } from './agent/report'
import type { MigrateOptions } from './options'
import { ErrorCode, UffdMigrateError } from './errors'

export function controlDir(): string {
  return process.env.XDG_RUNTIME_DIR ? join(process.env.XDG_RUNTIME_DIR, 'uffd-migrate') : '/run/uffd-migrate'
}

export function controlSocketPath(name: string): string {
  return join(controlDir(), `${name}.sock`)
}

export type ControlRequest = { cmd: 'status' } | { cmd: 'migrate'; options: MigrateOptions } | { cmd: 'cancel' }

/** What the control socket needs of a guest (Guest has it; no import of guest.ts). */
export interface ControlledGuest {
  readonly name: string
  readonly phase: string
  readonly restored: boolean
  readonly progress: Progress | undefined
  readonly lastError: { code: string; message: string } | undefined
  /** receive mode: connections refused so far, by error code. */
  readonly refusals?: Record<string, number>
  readonly regions: Record<string, { name: string; sizeBytes: number; pagesLeft?: number }>
  /** The dirty-page tracker a migration from here gets, and why. */
  readonly tracker?: string
  migrate(options: MigrateOptions): Promise<MigrationReport>
  cancel(): Promise<void>
  on(event: 'progress', listener: (p: Progress) => void): unknown
  off(event: 'progress', listener: (p: Progress) => void): unknown
}

export class ControlServer {
  private constructor(private readonly server: Server, readonly path: string) {}

  static async start(guest: ControlledGuest): Promise<ControlServer> {
    const path = controlSocketPath(guest.name)
    mkdirSync(controlDir(), { recursive: true, mode: 0o700 })
    if (existsSync(path)) {
      // a stale socket from a process that died, or a live guest of the same name
      const live = await new Promise<boolean>((resolve) => {
        const s = require('node:net').connect(path)
        s.once('connect', () => (s.destroy(), resolve(true)))
        s.once('error', () => resolve(false))
      })
      if (live) throw new UffdMigrateError(`a guest named '${guest.name}' is already running (${path})`, ErrorCode.BUSY)
      unlinkSync(path)
    }
    const server = createServer((s) => handle(guest, s))
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject)
      server.listen(path, () => resolve())
    })
    server.unref()
    return new ControlServer(server, path)
  }

  close(): void {
    this.server.close()
    try {
      unlinkSync(this.path)
    } catch {
      // already gone
    }
  }
}

/** Client side: sends one request to the control socket at `path`; onLine gets each JSON line of the answer. */
export function controlRequest(path: string, req: ControlRequest, onLine: (m: Record<string, unknown>) => void): Promise<void> {
  return new Promise((resolve, reject) => {
    const s = connect(path)
    let buf = ''
    s.on('connect', () => s.write(JSON.stringify(req) + '\n'))
    s.on('data', (c) => {
      buf += c.toString('utf8')
      let nl
      while ((nl = buf.indexOf('\n')) >= 0) {
        onLine(JSON.parse(buf.slice(0, nl)))
        buf = buf.slice(nl + 1)
      }
    })
    s.on('end', resolve)
    s.on('error', reject)
  })
}

function handle(guest: ControlledGuest, s: Socket): void {
  let buf = ''
  const send = (o: object) => s.write(JSON.stringify(o) + '\n')
  s.on('error', () => {})
  s.on('data', (chunk) => {
    buf += chunk.toString('utf8')
    if (buf.length > 1 << 20) return s.destroy()
    const nl = buf.indexOf('\n')
    if (nl < 0) return
    let req: ControlRequest
    try {
      req = JSON.parse(buf.slice(0, nl))
    } catch {
      send({ type: 'error', code: ErrorCode.INVALID_ARG, message: 'expected one JSON request per line' })
      return void s.end()
    }
    buf = ''
    if (req.cmd === 'status') {
      send({ type: 'status', name: guest.name, pid: process.pid, phase: guest.phase, restored: guest.restored, progress: guest.progress, lastError: guest.lastError, refusals: guest.refusals, tracker: guest.tracker, regions: Object.values(guest.regions).map((r) => ({ name: r.name, sizeBytes: r.sizeBytes, ...(r.pagesLeft ? { pagesLeft: r.pagesLeft } : {}) })) })
      return void s.end()
    }
    if (req.cmd === 'migrate') {
      const onProgress = (p: object) => send({ type: 'progress', progress: p })
      guest.on('progress', onProgress)
      // the CLI's connection counts as a listener: the guest exits after replying
      guest.migrate(req.options).then(
        (report) => {
          guest.off('progress', onProgress)
          send({ type: 'report', report })
          s.end()
        },
        (err: UffdMigrateError & { afterHandoff?: boolean }) => {
          guest.off('progress', onProgress)
          send({ type: 'error', code: err.code, message: err.message, ...(err.afterHandoff ? { afterHandoff: true } : {}) })
          s.end()
        },
      )
      return
    }
    if (req.cmd === 'cancel') {
      guest.cancel().then(
        () => send({ type: 'cancelled' }),
        (err: UffdMigrateError) => send({ type: 'error', code: err.code, message: err.message }),
      ).finally(() => s.end())
      return
    }
    send({ type: 'error', code: ErrorCode.INVALID_ARG, message: `unknown command ${JSON.stringify((req as { cmd: unknown }).cmd)}` })
    s.end()
  })
}
