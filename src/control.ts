/**
 * The guest's control socket: a Unix socket named after the guest, through
 * which `uffd-migrate send` and `status` drive it. One JSON object per line.
 */
import { mkdirSync, readdirSync, unlinkSync, existsSync } from 'node:fs'
import { connect, createServer, type Server, type Socket } from 'node:net'
import { join } from 'node:path'
import type { Progress } from './agent/source/index'
import type { MigrationReport } from './agent/report'
import type { PreflightReport } from './agent/source/preflight'
import type { MigrateOptions } from './options'
import { ErrorCode, UffdMigrateError } from './errors'
import { logLine } from './log'

export function controlDir(): string {
  return process.env.XDG_RUNTIME_DIR ? join(process.env.XDG_RUNTIME_DIR, 'uffd-migrate') : '/run/uffd-migrate'
}

export function controlSocketPath(name: string): string {
  return join(controlDir(), `${name}.sock`)
}

/** release: a guest that moved away gives up its name to the guest of that name that runs here again (ControlServer.start). */
export type ControlRequest =
  | { cmd: 'status' }
  | { cmd: 'migrate'; options: MigrateOptions }
  | { cmd: 'preflight'; options: MigrateOptions }
  | { cmd: 'cancel' }
  | { cmd: 'setBandwidth'; limits: Pick<MigrateOptions, 'maxBandwidth' | 'maxPostcopyBandwidth'> }
  | { cmd: 'release' }

/** What a forwarder does now: open relayed connections and proxied requests (each keeps the process), those held
 * since pause(), totals so far (bytes: of those that ended), ms since the last one ended. */
export interface ForwardingStatus {
  open: number
  held: number
  connections: number
  requests: number
  bytes: number
  idleMs: number
}

/** A guest that moved away: where to, what its forwarder does, and after how long without clients it exits (undefined: the service keeps the process). */
export interface MovedStatus {
  to: string
  forwarding?: ForwardingStatus
  exitsAfterIdleMs?: number
}

/** What the control socket needs of a guest (Guest has it; no import of guest.ts). */
export interface ControlledGuest {
  readonly name: string
  readonly phase: string
  readonly restored: boolean
  readonly progress: Progress | undefined
  readonly lastError: { code: string; message: string } | undefined
  /** receive mode: connections refused so far, by error code. */
  readonly refusals?: Record<string, number>
  /** receive mode, while a source's session runs before the hand-off: its address. */
  readonly from?: string
  /** The id of the migration running, or of the last one (from here, or the one that brought the service here). */
  readonly migration?: string
  readonly regions: Record<string, { name: string; sizeBytes: number; pagesLeft?: number }>
  /** The dirty-page tracker a migration from here gets, and why. */
  readonly tracker?: string
  /** A destination recovering a broken link: why it broke. */
  readonly linkBrokenBy?: string
  /** A source holding a stop signal until its migration ends (src/signal-hold.ts). */
  readonly signals?: { readonly held: string | undefined }
  readonly moved?: MovedStatus
  migrate(options: MigrateOptions): Promise<MigrationReport>
  preflight(options: MigrateOptions): Promise<PreflightReport>
  cancel(): Promise<void>
  setBandwidth(limits: Pick<MigrateOptions, 'maxBandwidth' | 'maxPostcopyBandwidth'>): Promise<unknown>
  on(event: 'progress', listener: (p: Progress) => void): unknown
  off(event: 'progress', listener: (p: Progress) => void): unknown
}

export class ControlServer {
  private constructor(private readonly server: Server, readonly path: string) {}

  static async start(guest: ControlledGuest): Promise<ControlServer> {
    const path = controlSocketPath(guest.name)
    mkdirSync(controlDir(), { recursive: true, mode: 0o700 })
    if (existsSync(path)) {
      // a stale socket from a process that died, or a live process of the same name: a guest that moved away
      // (its forwarder relays clients, or the service kept it with a 'moved' listener) gives the name to the one that
      // runs here now (it came back) and closes its socket first (closing removes the path: after, it would remove
      // the newcomer's); any other is a second guest of that name
      // a live holder that does not answer within 2 s (its thread is busy) is not ours to take either
      const probe = await probeGuest(guest.name, 2000)
      const holder = probe.state === 'stale' ? undefined : typeof probe.status?.phase === 'string' ? probe.status.phase : '?'
      if (holder === 'moved') await controlRequest(path, { cmd: 'release' }, () => {}).catch(() => {})
      else if (holder !== undefined) throw new UffdMigrateError(`a guest named '${guest.name}' is already running here (${path}, ${holder})`, ErrorCode.BUSY)
      if (existsSync(path)) unlinkSync(path)
    }
    let control: ControlServer | undefined
    const server = createServer((s) => handle(guest, s, () => control?.close()))
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject)
      server.listen(path, () => resolve())
    })
    server.unref()
    control = new ControlServer(server, path)
    return control
  }

  private closed = false

  close(): void {
    if (this.closed) return
    this.closed = true
    this.server.close() // (libuv removes the socket's path as it closes it)
    try {
      unlinkSync(this.path)
    } catch {
      // already gone
    }
  }
}

/** Receive mode goes on without a control socket when it cannot have one, and says so (status and send cannot reach it). */
export function withoutControl(name: string): (err: Error) => undefined {
  return (err) => {
    logLine(name, 'no-control-socket', `no control socket (${err.message}): \`uffd-migrate status/send --guest ${name}\` cannot reach it`, 'warn')
    return undefined
  }
}

/** One guest's status, or why there is none: no process behind its socket (stale), or none that answered within waitMs (busy). */
function probeGuest(name: string, waitMs: number): Promise<GuestListing> {
  let status: Record<string, unknown> | undefined
  return controlRequest(controlSocketPath(name), { cmd: 'status' }, (m) => (status = m), waitMs).then(
    (): GuestListing => (status ? { name, state: 'answering', status } : { name, state: 'busy' }),
    (err: NodeJS.ErrnoException): GuestListing => ({ name, state: err.code === 'ECONNREFUSED' || err.code === 'ENOENT' ? 'stale' : 'busy' }),
  )
}

/** A control socket of this host, and what its guest said (`uffd-migrate list`). */
export interface GuestListing {
  name: string
  /** answering: its status; stale: no process behind the socket; busy: a process that did not answer within the wait. */
  state: 'answering' | 'stale' | 'busy'
  status?: Record<string, unknown>
}

/** Every guest with a control socket here, by name, each asked for its status (at most waitMs each, all at once). */
export async function listGuests(waitMs = 2000): Promise<GuestListing[]> {
  let names: string[]
  try {
    names = readdirSync(controlDir()).filter((f) => f.endsWith('.sock')).map((f) => f.slice(0, -'.sock'.length)).sort()
  } catch {
    return [] // no directory: no guest ever ran here
  }
  return Promise.all(names.map((name) => probeGuest(name, waitMs)))
}

/**
 * Client side: sends one request to the control socket at `path`; onLine gets each JSON line of the answer.
 * quietMs: a guest silent that long is given up (the connection closed, ETIMEDOUT), for requests that must not wait.
 */
export function controlRequest(path: string, req: ControlRequest, onLine: (m: Record<string, unknown>) => void, quietMs = 0): Promise<void> {
  return new Promise((resolve, reject) => {
    const s = connect(path)
    if (quietMs) s.setTimeout(quietMs, () => (s.destroy(), reject(Object.assign(new Error(`no answer from ${path} within ${quietMs} ms`), { code: 'ETIMEDOUT' }))))
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

function handle(guest: ControlledGuest, s: Socket, release: () => void): void {
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
    if (req.cmd === 'release') {
      // only a guest that moved away: its name goes to the guest of that name that runs here again
      if (guest.phase === 'moved') release()
      else send({ type: 'error', code: ErrorCode.BUSY, message: `guest '${guest.name}' runs here (${guest.phase}): it keeps its name` })
      return void s.end()
    }
    if (req.cmd === 'status') {
      send({ type: 'status', name: guest.name, pid: process.pid, phase: guest.phase, migration: guest.migration, from: guest.from, restored: guest.restored, progress: guest.progress, lastError: guest.lastError, refusals: guest.refusals, tracker: guest.tracker, ...(guest.linkBrokenBy ? { brokenBy: guest.linkBrokenBy } : {}), ...(guest.signals?.held ? { signalHeld: guest.signals.held } : {}), moved: guest.moved, regions: Object.values(guest.regions).map((r) => ({ name: r.name, sizeBytes: r.sizeBytes, ...(r.pagesLeft ? { pagesLeft: r.pagesLeft } : {}) })) })
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
        (err: UffdMigrateError & { afterHandoff?: boolean; runsOn?: 'unknown' }) => {
          guest.off('progress', onProgress)
          send({ type: 'error', code: err.code, message: err.message, ...(guest.migration ? { migration: guest.migration } : {}), ...(err.afterHandoff ? { afterHandoff: true } : {}), ...(err.runsOn ? { runsOn: err.runsOn } : {}) })
          s.end()
        },
      )
      return
    }
    if (req.cmd === 'preflight') {
      guest.preflight(req.options).then(
        (report) => send({ type: 'preflight', report }),
        (err: UffdMigrateError) => send({ type: 'error', code: err.code, message: err.message, ...(err.migration ? { migration: err.migration } : {}) }),
      ).finally(() => s.end())
      return
    }
    if (req.cmd === 'cancel') {
      guest.cancel().then(
        () => send({ type: 'cancelled' }),
        (err: UffdMigrateError) => send({ type: 'error', code: err.code, message: err.message }),
      ).finally(() => s.end())
      return
    }
    if (req.cmd === 'setBandwidth') {
      guest.setBandwidth(req.limits ?? {}).then(
        (limits) => send({ type: 'bandwidth', limits }),
        (err: UffdMigrateError) => send({ type: 'error', code: err.code, message: err.message }),
      ).finally(() => s.end())
      return
    }
    send({ type: 'error', code: ErrorCode.INVALID_ARG, message: `unknown command ${JSON.stringify((req as { cmd: unknown }).cmd)}` })
    s.end()
  })
}
