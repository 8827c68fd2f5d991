/**
 * The source's link layer: dial the destination, authenticate both
 * connections of a session (urgent first: the destination pairs them by
 * session), and the clock exchange. The only file of the source that knows
 * about TCP; the pure tier passes a dialer that returns in-memory transports.
 */
import { connect, type Socket } from 'node:net'
import type { NativeBinding } from '../../binding'
import { ErrorCode, migrationError, type UffdMigrateError } from '../../errors'
import { Channel, type Transport } from '../../protocol/channel'
import type { Frame } from '../../protocol/frames'
import { clientHandshake, peerError } from '../../protocol/handshake'
import { decodeControl, encodeControl, field, Msg } from '../../protocol/messages'
import { parseAddress } from '../address'
import { detectSilence, paceSocket, postcopyBulkSocket, precopyBulkSocket } from '../socket-settings'
import { type Bandwidth, perConnection } from './bandwidth'
import { type Clock, sleep, systemClock } from '../clock'
import { deadline, realTimers } from '../../deadline'
import { nativeDemandAvailable } from '../demand-events'
import { nativeSealAvailable } from '../native-seal'
import { msgName } from '../message-table'
import { PeerWatch } from './peer-watch'

/** Opens one connection to host:port (TCP in production). */
export type Dialer = (host: string, port: number, timeoutMs: number) => Promise<Transport>

export interface LinkOptions {
  to: string
  token: Buffer
  connectTimeoutMs: number
  linkTimeoutMs: number
  bulkBufferBytes: number
  pushUnsentBytes?: number
  /** Ask for sealed connections (the destination may insist anyway: `encrypted` says what was agreed). */
  encrypt?: boolean
  /** The operator's limits (bandwidth.ts), shared by every link of the migration. */
  bandwidth?: Bandwidth
  dial?: Dialer
  clock?: Clock
}

/** Tries of a destination that answers ERR_MIGRATION_BUSY with retryAfterMs (its slot is held by a session that has not started). */
const BUSY_TRIES = 3

export class SourceLink {
  readonly urgent: Channel
  readonly bulk: Channel
  /** Page requests of faults and their replies, between two native threads (absent: they go on urgent, in JS). */
  readonly demand: Channel | undefined
  private keepalive: NodeJS.Timeout | undefined
  /** Nothing read from the destination for linkTimeoutMs: it is stuck (watchPeer()). */
  private readonly watch: PeerWatch

  /** Extra bulk streams (pre-copy only; openStreams()), closed at the hand-off. */
  streams: Channel[] = []

  private constructor(
    urgent: Channel, bulk: Channel, demand: Channel | undefined, linkTimeoutMs: number,
    /** Post-copy: the bulk socket's kernel buffers go back to the post-copy size (a pushed page a fault waits for sits behind less). */
    readonly enterPostcopy: () => void,
    /** Dials and authenticates one more connection of the session, tuned like bulk before the hand-off. */
    private readonly dialStream: () => Promise<Channel>,
    /** The session's clock: closeAfterPeer()'s wait runs on it (a fake one in the pure tier). */
    private readonly clock: Clock,
    /** The kernel's pacing of the bulk sockets, and the limits it follows. */
    private readonly pacing: { setter: NativeBinding['setSocketPacing']; bandwidth?: Bandwidth },
  ) {
    this.urgent = urgent
    this.bulk = bulk
    this.demand = demand
    if (linkTimeoutMs > 0) {
      // the destination takes a quiet link for a stuck source after linkTimeoutMs
      this.keepalive = setInterval(() => {
        if (!urgent.failed && !urgent.needsDrain) urgent.send(encodeControl(Msg.KEEPALIVE, {}))
      }, linkTimeoutMs / 4)
      this.keepalive.unref()
      urgent.onClose(() => clearInterval(this.keepalive))
    }
    this.watch = new PeerWatch(clock, linkTimeoutMs, () => urgent.bytesRead + bulk.bytesRead + (demand?.bytesRead ?? 0), (err) => {
      for (const ch of [urgent, bulk, demand]) ch?.fail(err)
    })
    urgent.onClose(() => this.watch.stop())
  }

  /**
   * From REGIONS (or a recovery's RECOVER_STATE) until SETTLED: the destination sends KEEPALIVE meanwhile, so a link
   * quiet for linkTimeoutMs fails as broken (src/agent/source/peer-watch.ts).
   */
  watchPeer(): void {
    this.watch.start()
  }

  /** Settled: a settled destination is quiet. */
  unwatchPeer(): void {
    this.watch.stop()
  }

  /**
   * Dials and authenticates both connections of `session`. A destination
   * whose slot another source holds without starting answers BUSY with
   * retryAfterMs: the slot lapses then, so wait and try again.
   */
  static async open(binding: NativeBinding, opts: LinkOptions, session: string): Promise<SourceLink> {
    for (let attempt = 1; ; attempt++) {
      try {
        return await SourceLink.openOnce(binding, opts, session)
      } catch (err) {
        const retryAfterMs = (err as UffdMigrateError).retryAfterMs
        if ((err as UffdMigrateError).code !== ErrorCode.BUSY || retryAfterMs === undefined || attempt >= BUSY_TRIES) throw err
        await sleep(opts.clock ?? systemClock, retryAfterMs)
      }
    }
  }

  private static async openOnce(binding: NativeBinding, opts: LinkOptions, session: string): Promise<SourceLink> {
    const { host, port } = parseAddress(opts.to)
    const dial = opts.dial ?? dialTcp
    const clock = opts.clock ?? systemClock
    const open = async (role: 'urgent' | 'bulk' | 'demand' | 'stream') => {
      const ch = new Channel(await dial(host, port, opts.connectTimeoutMs), role)
      // an address that accepts and never answers (a stopped receiver, a proxy with nothing behind it) is a peer that
      // stopped answering: without a deadline send (or a recovery, past its own) waited for ever
      const cancel = opts.linkTimeoutMs > 0 ? deadline(clock, opts.linkTimeoutMs, () => ch.fail(migrationError(ErrorCode.CONNECT,
        `${opts.to} accepted the ${role} connection but did not complete the handshake within ${opts.linkTimeoutMs} ms (linkTimeoutMs): a stopped or overloaded receiver, or a proxy with nothing behind it`))) : undefined
      try {
        await clientHandshake(ch, opts.token, { role, session }, opts.encrypt)
      } catch (err) {
        ch.close()
        throw err
      } finally {
        cancel?.()
      }
      return ch
    }
    const urgent = await open('urgent')
    let bulk: Channel, demand: Channel | undefined
    try {
      bulk = await open('bulk')
      // TCP only: the native threads take the connection's descriptor over (a sealed one they seal and open themselves)
      if (nativeDemandAvailable(binding) && !opts.dial && (!urgent.sealed || nativeSealAvailable(binding))) demand = await open('demand').catch((err) => (bulk.close(), Promise.reject(err)))
    } catch (err) {
      urgent.close()
      throw err
    }
    // a link opened before the hand-off starts with pre-copy's larger buffers; post-copy (and a link reopened in it) shrinks them
    // and caps the push's unsent bytes
    precopyBulkSocket(bulk, binding, opts.bulkBufferBytes)
    const shrink = () => postcopyBulkSocket(bulk, binding, opts.bulkBufferBytes, opts.pushUnsentBytes)
    for (const ch of [urgent, bulk, demand]) {
      if (ch) detectSilence(ch, binding.setSocketLiveness, opts.linkTimeoutMs)
      if (ch) ch.stallTimeoutMs = opts.linkTimeoutMs
    }
    const dialStream = async () => {
      const ch = await open('stream')
      precopyBulkSocket(ch, binding, opts.bulkBufferBytes)
      detectSilence(ch, binding.setSocketLiveness, opts.linkTimeoutMs)
      ch.stallTimeoutMs = opts.linkTimeoutMs
      return ch
    }
    const link = new SourceLink(urgent, bulk, demand, opts.linkTimeoutMs, shrink, dialStream, clock, { setter: binding.setSocketPacing, bandwidth: opts.bandwidth })
    link.pace()
    return link
  }

  private paced = false

  /** The bulk sockets send at most the limit of the migration's phase, shared out evenly (demand and urgent never). */
  pace(): void {
    const bytesPerSec = this.pacing.bandwidth?.bytesPerSec ?? 0
    if (!bytesPerSec && !this.paced) return // never limited: nothing to undo
    this.paced = true
    const bulk = [this.bulk, ...this.streams]
    for (const ch of bulk) paceSocket(ch, this.pacing.setter, perConnection(bytesPerSec, bulk.length))
  }

  /** Opens `count` extra bulk streams (granted by REGIONS_OK); on a failure the ones opened are closed. */
  async openStreams(count: number): Promise<Channel[]> {
    try {
      for (let i = 0; i < count; i++) this.streams.push(await this.dialStream())
      this.pace()
    } catch (err) {
      this.closeStreams()
      throw err
    }
    return this.streams
  }

  /** The hand-off: the extra streams are quiet (barrier done) and not used again. */
  closeStreams(): void {
    const streams = this.streams
    this.streams = []
    for (const s of streams) {
      this.closedStreamBytes += s.bytesWritten
      s.close()
    }
  }

  /** The connections are sealed (either side asked): each native thread seals and opens its own (native/records.h). */
  get encrypted(): boolean {
    return this.urgent.sealed
  }

  get bytesWritten(): number {
    return this.urgent.bytesWritten + this.bulk.bytesWritten + this.streams.reduce((n, s) => n + s.bytesWritten, 0) + this.closedStreamBytes
  }

  /** Bytes the extra streams wrote before they closed. */
  private closedStreamBytes = 0

  get bytesRead(): number {
    return this.urgent.bytesRead + this.bulk.bytesRead
  }

  close(): void {
    this.watch.stop()
    this.closeData()
    this.urgent.close()
  }

  /** Everything but urgent: the keepalive, bulk, demand and the extra streams. */
  private closeData(): void {
    clearInterval(this.keepalive)
    this.bulk.close()
    this.demand?.close()
    this.closeStreams()
  }

  /**
   * Closes the link after a cancel: the data connections at once, urgent once
   * the destination hung up too (it ends its session on the ERROR, or on
   * bulk's end), at most waitMs. So a cancel returns when the destination is
   * listening again, and a `send` run right after it is not refused as busy.
   */
  async closeAfterPeer(waitMs: number): Promise<void> {
    this.watch.stop()
    this.closeData()
    await this.untilEnded([this.urgent], waitMs)
    this.urgent.close()
  }

  /** Tells the destination why this side ends the migration (a cancel, its own failure), on urgent and bulk. */
  tell(err: Error): void {
    this.bulk.sendError(err)
    this.urgent.sendError(err)
  }

  /**
   * After a connection broke: waits until urgent and bulk have both ended, or graceMs of this process's running time,
   * and resolves with the destination's ERROR if one was read on them (its reason), else undefined. A destination that
   * settles or gives up closes every connection at once, and the one that tells this side first need not carry its
   * last words (the demand connection, read by a native thread, often does).
   */
  async lastWords(graceMs: number): Promise<UffdMigrateError | undefined> {
    await this.untilEnded([this.urgent, this.bulk], graceMs)
    const said = this.urgent.peerErrorFrame ?? this.bulk.peerErrorFrame
    try {
      const err = said && peerError(said.payload)
      return err?.fromPeer ? err : undefined
    } catch {
      return undefined // (malformed: the broken link stands)
    }
  }

  /**
   * Until each of these connections has ended (the peer hung up, or it failed), at most ms of this process's running
   * time (a deadline: after a stop, what arrived meanwhile is read first). The wait alone keeps no process alive.
   */
  private untilEnded(channels: Channel[], ms: number): Promise<void> {
    const open = channels.filter((ch) => !ch.failed)
    if (open.length === 0) return Promise.resolve()
    return new Promise<void>((resolve) => {
      const cancel = deadline(this.clock, ms, resolve)
      void Promise.all(open.map((ch) => new Promise<void>((ended) => ch.onClose(() => ended())))).then(() => {
        cancel()
        resolve()
      })
    })
  }

  /** Destination clock minus ours, from the exchange with the smallest round trip. */
  async syncClock(clock: Clock): Promise<{ offsetMs: number; rttMs: number }> {
    let best = { offsetMs: 0, rttMs: Infinity }
    for (let i = 0; i < 8; i++) {
      const t0 = clock.now()
      this.urgent.send(encodeControl(Msg.CLOCK, { t0 }))
      const f = await reply(this.urgent, Msg.CLOCK)
      const t2 = clock.now()
      const t1 = field<number>(decodeControl(f.type, f.payload), 't1', 'number', 'CLOCK')
      if (t2 - t0 < best.rttMs) best = { offsetMs: t1 - (t0 + t2) / 2, rttMs: t2 - t0 }
    }
    return best
  }
}

/**
 * How long SourceLink.lastWords() waits at most. Taking a connection's end for a broken link at once dropped the
 * destination's SETTLED on its way (the source then dialled a host that was gone until its recovery timeout: seen on a
 * loaded 2-vCPU machine, the migration complete there and `send` still recovering 45 s later), and its ERROR (seen in
 * CI: a destination that could not place pages, dialled for 60 s). A link that really broke costs this long at most.
 */
export const LAST_WORDS_MS = 300

/**
 * The next frame on ch, which must be `type` (an ERROR is raised as the peer's error). deadlineMs (0: none): an answer
 * the peer gives at once; none within it fails the connection as a broken link (a peer stopped after its handshake).
 */
export async function reply(ch: Channel, type: Msg, deadlineMs = 0, clock: Clock = systemClock): Promise<Frame> {
  const cancel = deadlineMs > 0 ? deadline(clock, deadlineMs, () => ch.fail(migrationError(ErrorCode.CONNECTION,
    `the destination did not answer with ${msgName(type)} within ${deadlineMs} ms (linkTimeoutMs): it looks stopped or wedged; treated as a broken link`))) : undefined
  try {
    let f = await ch.nextFrame()
    // the destination's KEEPALIVE (urgent, from REGIONS on) may come before the answer: it is never one
    while (f.type === Msg.KEEPALIVE) f = await ch.nextFrame()
    if (f.type === Msg.ERROR) throw peerError(f.payload)
    if (f.type !== type) throw migrationError(ErrorCode.PROTOCOL, `expected ${msgName(type)}, got message ${msgName(f.type)}`)
    return f
  } finally {
    cancel?.()
  }
}

/**
 * A recovery's question on a fresh link: RECOVER on its bulk connection, RECOVER_STATE back within deadlineMs (past it
 * the link counts as broken: a destination stopped after its handshake). askedAtMs: this clock when it asked.
 */
export async function askRecoverState(bulk: Channel, deadlineMs: number, clock: Clock): Promise<{ state: Record<string, unknown>; askedAtMs: number }> {
  bulk.send(encodeControl(Msg.RECOVER, {}))
  const askedAtMs = clock.now()
  const f = await reply(bulk, Msg.RECOVER_STATE, deadlineMs, clock)
  return { state: decodeControl(f.type, f.payload), askedAtMs }
}

/** Connects, retrying refused connections until timeoutMs (the destination may still be starting). */
export async function dialTcp(host: string, port: number, timeoutMs: number): Promise<Socket> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    try {
      return await dialOnce(host, port, Math.max(1, deadline - Date.now()))
    } catch (err) {
      const code = ((err as UffdMigrateError).cause as NodeJS.ErrnoException | undefined)?.code
      if (code !== 'ECONNREFUSED' || Date.now() + 100 >= deadline) throw err
      await new Promise((r) => setTimeout(r, 100))
    }
  }
}

function dialOnce(host: string, port: number, timeoutMs: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = connect({ host, port })
    // (a deadline: after a stop, a connection that completed meanwhile is seen before it judges)
    const cancel = deadline(realTimers, timeoutMs, () => {
      s.destroy()
      reject(migrationError(ErrorCode.CONNECT, `could not connect to ${host}:${port} within ${timeoutMs} ms: is \`uffd-migrate receive\` listening there?`))
    })
    s.once('connect', () => {
      cancel()
      resolve(s)
    })
    s.once('error', (err: NodeJS.ErrnoException) => {
      cancel()
      reject(migrationError(ErrorCode.CONNECT, `could not connect to ${host}:${port}: ${err.code ?? err.message}; is \`uffd-migrate receive --listen ${host}:${port}\` running on the destination?`, err))
    })
  })
}
