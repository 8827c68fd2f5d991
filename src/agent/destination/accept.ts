/**
 * The destination's link layer: the listening socket, the handshake of each
 * incoming connection, and pairing the urgent and bulk connections of one
 * session. The only file of the destination that knows about TCP; the pure
 * tier hands it in-memory transports through accept().
 */
import { createServer, type Server } from 'node:net'
import { ErrorCode, migrationError, type UffdMigrateError } from '../../errors'
import { Channel, type Transport } from '../../protocol/channel'
import { type ChannelRole, type HelloInfo, serverHandshake } from '../../protocol/handshake'
import { parseAddress } from '../address'
import type { Clock } from '../clock'
import { deadline } from '../../deadline'
import { DestPhase } from './machine'

export interface AcceptorHost {
  readonly phase: DestPhase
  /** A connection of this session passed the handshake and took its slot. */
  adopt(ch: Channel, role: ChannelRole): void
  /** A connection was refused (peer's fault); one line for the operator. */
  refused(message: string): void
  /** The session holding the slot did not send its region table in time: end it. */
  expired(err: Error): void
  /** A session in pre-copy whose source went quiet (it may be gone): in how many ms the watchdog drops it, else undefined. */
  quietSessionEndsInMs?(): number | undefined
}

export interface AcceptorLimits {
  /** A connection must authenticate within this, and a session send REGIONS within this of taking the slot. */
  handshakeTimeoutMs: number
  /** Connections still in their handshake at one time; beyond it new ones are closed at once. */
  maxUnauthenticated: number
}

/** After a quiet session's drop time, the new source waits this much more (the watchdog's tick, and the end of the session). */
const QUIET_RETRY_MARGIN_MS = 300

export const DEFAULT_ACCEPTOR_LIMITS: AcceptorLimits = { handshakeTimeoutMs: 5000, maxUnauthenticated: 16 }

export class Acceptor {
  private server: Server | undefined
  private session: string | undefined
  /** When the session's slot lapses unless it has sent REGIONS by then. */
  private slotDeadlineMs = 0
  /** Cancels the slot's deadline. */
  private slotTimer: (() => void) | undefined
  /** Connections in their handshake now, oldest first (the peer's address for the log). */
  private readonly unauthenticated = new Map<Channel, string>()
  /** Refused connections by error code (status shows them). */
  readonly refusals: Record<string, number> = {}
  urgent: Channel | undefined
  bulk: Channel | undefined
  /** Read and written by the native demand thread once adopted (not in `channels`: no frames for JS). */
  demand: Channel | undefined
  /** Extra bulk streams of the session (read by native threads: not in `channels`), and how many it may open. */
  streams: Channel[] = []
  streamsAllowed = 0
  /** The address of the session's bulk connection (the source, for the operator's log). */
  sessionPeer = ''

  constructor(
    private readonly token: Buffer,
    private readonly host: AcceptorHost,
    private readonly clock: Clock,
    private readonly limits: AcceptorLimits = DEFAULT_ACCEPTOR_LIMITS,
    /** Insist on sealed connections. */
    private readonly encrypt = false,
  ) {}

  /** Starts listening; resolves with the bound port. */
  listen(addr: string): Promise<number> {
    const { host, port } = parseAddress(addr, '0.0.0.0')
    return new Promise((resolve, reject) => {
      this.server = createServer((s) => void this.accept(s))
      this.server.once('error', (err) =>
        reject(migrationError(ErrorCode.CONNECT, `cannot listen on ${addr}: ${(err as NodeJS.ErrnoException).code ?? err.message}`, err)),
      )
      this.server.listen(port, host, () => {
        const a = this.server!.address()
        resolve(typeof a === 'object' && a ? a.port : port)
      })
    })
  }

  async accept(transport: Transport, peer = describePeer(transport)): Promise<void> {
    const ch = new Channel(transport, 'incoming')
    if (this.unauthenticated.size >= this.limits.maxUnauthenticated) {
      // the oldest makes room (sshd's MaxStartups, oldest-first): a flood of idle connections
      // cannot keep a real source out, whose handshake takes a few round trips
      const [oldest] = this.unauthenticated.keys()
      this.unauthenticated.delete(oldest)
      oldest.fail(migrationError(ErrorCode.BUSY, `closed to make room: ${this.limits.maxUnauthenticated} connections were authenticating at once (the limit), the oldest goes first`))
      oldest.destroy()
    }
    this.unauthenticated.set(ch, peer)
    const cancel = deadline(this.clock, this.limits.handshakeTimeoutMs, () => {
      ch.fail(migrationError(ErrorCode.TIMEOUT, `did not authenticate within ${this.limits.handshakeTimeoutMs} ms`))
      ch.destroy()
    })
    const authenticated = () => {
      this.unauthenticated.delete(ch)
      cancel()
    }
    try {
      let rejoin = false
      const info = await serverHandshake(ch, this.token, (hello) => {
        authenticated()
        rejoin = this.admit(hello)
      }, this.encrypt)
      if (info.role === 'stream') {
        this.streams.push(ch)
        return this.host.adopt(ch, info.role)
      }
      // recovering: a connection of an attempt that broke half-way gives way to the new one
      const replaced = rejoin ? this[info.role] : undefined
      this[info.role] = ch
      if (info.role === 'bulk') this.sessionPeer = peer
      this.host.adopt(ch, info.role)
      replaced?.close()
    } catch (err) {
      authenticated()
      // refused before any page moved; keep listening for a proper source
      ch.sendError(err as Error)
      ch.fail(err as Error)
      this.refuse(peer, err as Error)
    }
  }

  /** An authenticated peer may join (true: it rejoins its session after a break); throws BUSY or PROTOCOL before READY. */
  private admit(info: HelloInfo): boolean {
    const phase = this.host.phase
    if (info.role === 'stream') {
      // only the session in pre-copy, as many as REGIONS_OK granted
      if (phase !== DestPhase.PRECOPY || info.session !== this.session) throw migrationError(ErrorCode.BUSY, 'a migration is already in progress on this destination')
      if (this.streams.length >= this.streamsAllowed) throw migrationError(ErrorCode.PROTOCOL, `more extra bulk streams than the ${this.streamsAllowed} granted`)
      return false
    }
    if ((phase === DestPhase.POSTCOPY || phase === DestPhase.PRECOPY) && info.session === this.session) this.supersede()
    const now = this.host.phase // superseded: recovering after the hand-off, or listening again before it
    const rejoin = (now === DestPhase.RECOVERING || phase === DestPhase.SETTLED) && info.session === this.session
    if (!rejoin && now !== DestPhase.LISTENING) throw this.busy()
    if (this.session && info.session !== this.session) {
      // the slot's holder has not sent its region table yet: it lapses by itself at the deadline
      const err = migrationError(ErrorCode.BUSY, 'another source is connecting to this destination; its slot lapses unless it starts within the handshake deadline')
      err.retryAfterMs = Math.max(0, Math.ceil(this.slotDeadlineMs - this.clock.now())) + 50
      throw err
    }
    if (this[info.role] && !rejoin) throw migrationError(ErrorCode.PROTOCOL, `a second ${info.role} connection for one session`)
    if (!this.session) this.takeSlot(info.session)
    this.session = info.session
    return rejoin
  }

  /**
   * The session's source dialled in again: it gave up on its connections, though from here they look alive (a reset
   * that reached one host only, a partition it noticed first). It dials in again only after it sent HANDOFF, so they are
   * broken: failing one makes the destination recover (its close listener), and this connection rejoins; or, when
   * HANDOFF never arrived here (pre-copy), ends the session first, so that this connection hears NO_SESSION and the
   * source resumes its service, and a HANDOFF still in flight on the old connections can no longer start it here.
   * Refused as BUSY, the source's recovery ended at once and the service ran on neither host. (QEMU needs
   * migrate-pause on the destination.)
   */
  private supersede(): void {
    ;(this.urgent ?? this.bulk)?.fail(migrationError(ErrorCode.CONNECTION, 'the source dialled in again with this session: its old connections are dead'))
  }

  /**
   * Another session has this destination. When its source went quiet in pre-copy (a reset that reached that source
   * only: it gave up, its service runs on, and it may already be trying again), the new one is told when the watchdog
   * drops the old session, and its SourceLink.open() tries again then; before, it failed at once with BUSY.
   */
  private busy(): UffdMigrateError {
    const err = migrationError(ErrorCode.BUSY, 'a migration is already in progress on this destination')
    const endsInMs = this.host.phase === DestPhase.PRECOPY ? this.host.quietSessionEndsInMs?.() : undefined
    if (endsInMs === undefined) return err
    err.message += `; its source has sent nothing for a while and is dropped as stuck in ${Math.ceil(endsInMs)} ms: try again then`
    err.retryAfterMs = Math.ceil(endsInMs) + QUIET_RETRY_MARGIN_MS
    return err
  }

  private refuse(peer: string, err: Error): void {
    const code = this.count(err)
    this.host.refused(`refused a connection from ${peer}: ${err.message} [${code}]`)
  }

  /** One more refusal with err's code; returns the code. */
  private count(err: Error): string {
    const code = (err as { code?: string }).code ?? ErrorCode.PROTOCOL
    this.refusals[code] = (this.refusals[code] ?? 0) + 1
    return code
  }

  /** A session takes the slot: it must send REGIONS (leave LISTENING) within the handshake deadline. */
  private takeSlot(session: string): void {
    this.slotDeadlineMs = this.clock.now() + this.limits.handshakeTimeoutMs
    this.slotTimer = deadline(this.clock, this.limits.handshakeTimeoutMs, () => {
      this.slotTimer = undefined
      if (this.session !== session || this.host.phase !== DestPhase.LISTENING) return
      const err = migrationError(ErrorCode.TIMEOUT, `session ${session} authenticated but did not send its region table within ${this.limits.handshakeTimeoutMs} ms; its slot is free again`)
      this.count(err)
      this.host.expired(err)
    })
  }

  /** The session's connections now. */
  get channels(): Channel[] {
    return [this.urgent, this.bulk].filter((c): c is Channel => c !== undefined)
  }

  /**
   * Tells the source why this side ends the session, on every connection, `first` (the one the reason concerns)
   * first: bulk, full of pages this side will not read, may reach it as a reset (SourceLink.tell() is the other way).
   */
  tell(err: Error, first?: Channel): void {
    first?.sendError(err)
    for (const ch of this.channels) ch.sendError(err)
  }

  /** Both connections of the session, when both are here. */
  get pair(): { urgent: Channel; bulk: Channel } | undefined {
    return this.urgent && this.bulk ? { urgent: this.urgent, bulk: this.bulk } : undefined
  }

  /** The link broke: both slots free for the session's next pair. */
  drop(err: Error): void {
    // slots first: the channels' close listeners must see a pair that is already gone
    const { urgent, bulk, demand, streams } = this
    this.urgent = undefined
    this.bulk = undefined
    this.demand = undefined
    this.streams = []
    this.streamsAllowed = 0
    urgent?.fail(err)
    bulk?.fail(err)
    demand?.fail(err)
    for (const s of streams) s.fail(err)
  }

  /** The session's id, once a source took the slot. */
  get sessionId(): string | undefined {
    return this.session
  }

  /** A new agent took over the session after the hand-off (the last one crashed): its source may rejoin. */
  resume(session: string, peer: string): void {
    this.session = session
    this.sessionPeer = peer
  }

  /** The session ended before the hand-off: the next source may bring another. */
  forgetSession(): void {
    this.session = undefined
    this.slotTimer?.()
    this.slotTimer = undefined
  }

  stopListening(): void {
    this.server?.close()
  }

  close(): void {
    this.forgetSession()
    this.server?.close()
    this.urgent?.close()
    this.bulk?.close()
    this.demand?.close()
    for (const s of this.streams) s.close()
  }
}

function describePeer(t: Transport): string {
  const s = t as { remoteAddress?: string; remotePort?: number }
  return s.remoteAddress ? `${s.remoteAddress}:${s.remotePort}` : 'an in-memory peer'
}
