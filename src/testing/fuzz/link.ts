/**
 * The fuzzer's connections of one session, opened with a correct handshake
 * as a source would: urgent and bulk, and over TCP the demand connection
 * (whose thread on the destination installs post-copy replies) and, once the
 * region table granted it, an extra bulk stream (a reader thread of its own,
 * beside bulk's, until the hand-off). A sealed
 * session derives each connection's keys as a source does and seals what the
 * fuzzer writes; the channels only read what the destination says.
 */
import type { MigrationDestination } from '../../agent/destination/index'
import { Channel } from '../../protocol/channel'
import { connectionKeys, ephemeralKey, handshakeProof, type KeyExchange, peerError } from '../../protocol/handshake'
import { decodeControl, encodeControl, Msg, PROTOCOL_NAME, PROTOCOL_VERSION } from '../../protocol/messages'
import { Sealer } from '../../protocol/records'
import type { FuzzChannel } from './mutate'
import type { FuzzEnd, Wire, WireKind } from './wire'

export const FUZZ_TOKEN = Buffer.from('fuzz-token-0123456789abcdef')

/** The fuzzer's X25519 key: a sealed session's connection keys come from it, as a source's do. */
const FUZZ_KEY = ephemeralKey()

/** The connections a session opens at once on each wire: the demand connection only where a native thread can take it. */
export const WIRE_CHANNELS: Record<WireKind, readonly FuzzChannel[]> = { memory: ['urgent', 'bulk'], tcp: ['urgent', 'bulk', 'demand'] }

/** What the proofs cover (the destination's HELLO gave its key and wish). */
function exchange(serverHello: Record<string, unknown>, encrypt: boolean): KeyExchange {
  return { clientKey: FUZZ_KEY.publicKey, serverKey: serverHello.key as Uint8Array, clientEncrypt: encrypt, serverEncrypt: serverHello.encrypt === true }
}

/** A source's HELLO for a connection of this role and session. */
export function helloFrame(role: FuzzChannel, session: string, nonce: Buffer, sealed: boolean): Buffer {
  return Buffer.concat(encodeControl(Msg.HELLO, { proto: PROTOCOL_NAME, version: PROTOCOL_VERSION, role, session, nonce, key: FUZZ_KEY.publicKey, encrypt: sealed }))
}

/** A source's AUTH answering the destination's HELLO (`serverHello`, decoded). */
export function authFrame(role: FuzzChannel, session: string, serverHello: Record<string, unknown>, nonce: Buffer, sealed: boolean): Buffer {
  const proof = handshakeProof(FUZZ_TOKEN, 'client', { role, session }, serverHello.nonce as Uint8Array, nonce, exchange(serverHello, sealed))
  return Buffer.concat(encodeControl(Msg.AUTH, { proof }))
}

/** Raw bytes on one end: sealed first when given a sealer (a sealed session after its handshake). */
export function writeRaw(end: FuzzEnd, bytes: Buffer, sealer?: Sealer): void {
  if (!bytes.length) return
  end.write(sealer ? Buffer.concat(sealer.seal([bytes])) : bytes)
}

/** The next frame the destination sends on ch; throws when none comes within a bounded number of turns. */
export async function nextFrame(wire: Wire, ch: Channel): Promise<{ type: number; payload: Buffer }> {
  const f = ch.nextFrame()
  for (let i = 0; i < 50; i++) {
    const got = await Promise.race([f, wire.turns(1).then(() => undefined)])
    if (got) return got
  }
  throw new Error('fuzzer: no answer from the destination')
}

export class FuzzLink {
  /** Every ERROR code the destination sent on any of these connections. */
  readonly codes: string[] = []
  /** The destination's SETTLED report, once it came. */
  settledReport: Record<string, unknown> | undefined
  /** PAGE_REQUESTs the destination's demand thread sent (a source answers on the demand connection only after one). */
  demandRequests = 0
  /** The session's service was made to ask for the pages of the demand replies (FuzzSession.askForReplies()). */
  repliesAsked = false
  /** Bulk streams the destination granted in REGIONS_OK (bulk included; undefined before it came). */
  streamsGranted: number | undefined
  /** SYNC answers on the extra stream. */
  streamSyncs = 0
  private readonly conns = new Map<FuzzChannel, { ch: Channel; end: FuzzEnd; sealer: Sealer | undefined }>()

  private constructor(private readonly wire: Wire, private readonly dest: MigrationDestination, private readonly session: string, private readonly sealed: boolean) {}

  /** Opens the session's connections: urgent and bulk, and demand over TCP (a native thread takes it). */
  static async open(wire: Wire, dest: MigrationDestination, session: string, sealed: boolean): Promise<FuzzLink> {
    const link = new FuzzLink(wire, dest, session, sealed)
    for (const role of WIRE_CHANNELS[wire.kind]) await link.add(role)
    return link
  }

  /** The extra bulk stream, once REGIONS_OK granted one (false: not granted, or refused). */
  async openStream(): Promise<boolean> {
    for (let i = 0; i < 50 && this.streamsGranted === undefined; i++) await this.wire.turns(1)
    if (!this.streamsGranted || this.streamsGranted < 2) return false
    return this.add('stream').then(() => true, () => false)
  }

  /** The connections open now (a mutation may move a frame to another of them). */
  get channels(): FuzzChannel[] {
    return [...this.conns.keys()]
  }

  get urgent(): Channel {
    return this.conns.get('urgent')!.ch
  }

  get bulk(): Channel {
    return this.conns.get('bulk')!.ch
  }

  get ends(): FuzzEnd[] {
    return [...this.conns.values()].map((c) => c.end)
  }

  has(channel: FuzzChannel): boolean {
    return this.conns.has(channel)
  }

  /** Bytes on a connection, sealed in a sealed session. */
  writeOn(channel: FuzzChannel, bytes: Buffer): void {
    const c = this.conns.get(channel)!
    writeRaw(c.end, bytes, c.sealer)
  }

  /** Bytes on a connection as they are (records the caller sealed, or broke). */
  writeRawOn(channel: FuzzChannel, bytes: Buffer): void {
    this.conns.get(channel)!.end.write(bytes)
  }

  sealerOf(channel: FuzzChannel): Sealer | undefined {
    return this.conns.get(channel)!.sealer
  }

  private async add(role: FuzzChannel): Promise<void> {
    const { dest, session, sealed } = this
    const [a, b] = await this.wire.pair()
    void dest.accept(b, 'fuzzer')
    const ch = new Channel(a, role)
    const nonce = Buffer.alloc(32, 7)
    writeRaw(a, helloFrame(role, session, nonce, sealed))
    const hello = await nextFrame(this.wire, ch)
    if (hello.type !== Msg.HELLO) throw new Error(`fuzzer: handshake refused: ${hello.type === Msg.ERROR ? peerError(hello.payload).message : hello.type}`)
    const reply = decodeControl(hello.type, hello.payload)
    const peerNonce = reply.nonce as Uint8Array
    writeRaw(a, authFrame(role, session, reply, nonce, sealed))
    let sealer: Sealer | undefined
    if (sealed) {
      const keys = connectionKeys(FUZZ_TOKEN, FUZZ_KEY.privateKey, reply.key as Uint8Array, { role, session }, nonce, peerNonce)
      sealer = new Sealer(keys.toServer)
      // the channel only reads (opens what the destination seals); a send key of its own would go unused
      ch.secure({ send: { key: Buffer.alloc(32), iv: Buffer.alloc(12) }, receive: keys.toClient })
    }
    const ready = await nextFrame(this.wire, ch)
    if (ready.type !== Msg.READY) throw new Error(`fuzzer: expected READY, got ${ready.type === Msg.ERROR ? peerError(ready.payload).message : ready.type}`)
    ch.authenticated()
    ch.onFrame((f) => {
      if (f.type === Msg.ERROR) this.codes.push(peerError(f.payload).code)
      if (f.type === Msg.SETTLED) this.settledReport = decodeControl(f.type, f.payload)
      if (f.type === Msg.PAGE_REQUEST && role === 'demand') this.demandRequests++
      if (f.type === Msg.REGIONS_OK && role === 'bulk') this.streamsGranted = Number(decodeControl(f.type, f.payload).streams ?? 1)
      if (f.type === Msg.SYNC && role === 'stream') this.streamSyncs++
    })
    this.conns.set(role, { ch, end: a, sealer })
  }
}
