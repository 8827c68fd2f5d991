/**
 * The destination's link layer: the listening socket, the handshake of each
 * incoming connection, and pairing the urgent and bulk connections of one
 * session. The only file of the destination that knows about TCP; the pure
 * tier hands it in-memory transports through accept().
 */
import { createServer, type Server } from 'node:net'
import { ErrorCode, migrationError } from '../../errors'
import { Channel, type Transport } from '../../protocol/channel'
import { serverHandshake } from '../../protocol/handshake'
import { parseAddress } from '../address'
import type { ChannelName } from '../message-table'
import { DestPhase } from './machine'

export interface AcceptorHost {
  readonly phase: DestPhase
  /** A connection of this session passed the handshake and took its slot. */
  adopt(ch: Channel, role: ChannelName): void
  /** A connection was refused (peer's fault); one line for the operator. */
  refused(message: string): void
}

export class Acceptor {
  private server: Server | undefined
  private session: string | undefined
  urgent: Channel | undefined
  bulk: Channel | undefined

  constructor(
    private readonly token: Buffer,
    private readonly host: AcceptorHost,
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
    try {
      const info = await serverHandshake(ch, this.token)
      const phase = this.host.phase
      const rejoin = (phase === DestPhase.RECOVERING || phase === DestPhase.SETTLED) && info.session === this.session
      if (phase !== DestPhase.LISTENING && !rejoin) throw migrationError(ErrorCode.BUSY, 'a migration is already in progress on this destination')
      if (this.session && info.session !== this.session) throw migrationError(ErrorCode.BUSY, 'a migration from another source is already connecting')
      this.session = info.session
      // recovering: a connection of an attempt that broke half-way gives way to the new one
      const replaced = rejoin ? this[info.role] : undefined
      if (this[info.role] && !rejoin) throw migrationError(ErrorCode.PROTOCOL, `a second ${info.role} connection for one session`)
      this[info.role] = ch
      this.host.adopt(ch, info.role)
      replaced?.close()
    } catch (err) {
      // refused before any page moved; keep listening for a proper source
      ch.sendError(err as Error)
      ch.fail(err as Error)
      this.host.refused(`refused a connection from ${peer}: ${(err as Error).message} [${(err as { code?: string }).code ?? ErrorCode.PROTOCOL}]`)
    }
  }

  /** Both connections of the session, when both are here. */
  get pair(): { urgent: Channel; bulk: Channel } | undefined {
    return this.urgent && this.bulk ? { urgent: this.urgent, bulk: this.bulk } : undefined
  }

  /** The link broke: both slots free for the session's next pair. */
  drop(err: Error): void {
    this.urgent?.fail(err)
    this.bulk?.fail(err)
    this.urgent = undefined
    this.bulk = undefined
  }

  /** The session ended before the hand-off: the next source may bring another. */
  forgetSession(): void {
    this.session = undefined
  }

  stopListening(): void {
    this.server?.close()
  }

  close(): void {
    this.server?.close()
    this.urgent?.close()
    this.bulk?.close()
  }
}

function describePeer(t: Transport): string {
  const s = t as { remoteAddress?: string; remotePort?: number }
  return s.remoteAddress ? `${s.remoteAddress}:${s.remotePort}` : 'an in-memory peer'
}
