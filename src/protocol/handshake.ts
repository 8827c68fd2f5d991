/**
 * Mutual authentication of one connection with a shared token: each side
 * proves it holds the token with an HMAC over both fresh nonces, so the token
 * never crosses the wire and a recorded exchange cannot be replayed. Nothing
 * but HELLO/AUTH/READY/ERROR is accepted before READY.
 */
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto'
import { ErrorCode, migrationError, UffdMigrateError } from '../errors'
import type { Channel } from './channel'
import { decodeControl, encodeControl, field, Msg, PROTOCOL_NAME, PROTOCOL_VERSION } from './messages'

/**
 * urgent and bulk always; demand when the source's native demand path answers
 * page faults (see src/agent/demand-events.ts); stream: an extra bulk stream,
 * opened after REGIONS_OK granted it (pre-copy only).
 */
export type ChannelRole = 'urgent' | 'bulk' | 'demand' | 'stream'

export interface HelloInfo {
  role: ChannelRole
  session: string
}

/** The HMAC one side sends to prove it holds the token (exported for the fuzzer, which writes raw handshakes). */
export function handshakeProof(token: Buffer, who: 'client' | 'server', info: HelloInfo, a: Uint8Array, b: Uint8Array): Buffer {
  return createHmac('sha256', token).update(`${PROTOCOL_NAME}/${who}/${info.role}/${info.session}/`).update(a).update(b).digest()
}

function checkVersion(msg: Record<string, unknown>): void {
  const proto = field<string>(msg, 'proto', 'string', 'HELLO')
  const version = field<number>(msg, 'version', 'number', 'HELLO')
  if (proto !== PROTOCOL_NAME || version !== PROTOCOL_VERSION) {
    throw migrationError(
      ErrorCode.VERSION,
      `peer speaks ${proto} protocol version ${version}; this side speaks ${PROTOCOL_NAME} version ${PROTOCOL_VERSION}: run the same uffd-migrate version on both hosts`,
    )
  }
}

function verify(expected: Buffer, got: Uint8Array, who: string): void {
  if (got.length !== expected.length || !timingSafeEqual(expected, got)) {
    throw migrationError(ErrorCode.AUTH, `${who} failed authentication: the shared tokens differ (check --token-file / UFFD_MIGRATE_TOKEN on both hosts)`)
  }
}

/** Raises an ERROR frame from the peer as the error it describes. */
export function peerError(payload: Buffer): UffdMigrateError {
  const m = decodeControl(Msg.ERROR, payload)
  const code = typeof m.code === 'string' ? m.code : ErrorCode.PROTOCOL
  const message = typeof m.message === 'string' ? m.message : 'no message'
  const err = new UffdMigrateError(`peer reported: ${message}`, code)
  err.fromPeer = true
  if (typeof m.retryAfterMs === 'number' && m.retryAfterMs >= 0) err.retryAfterMs = Math.min(m.retryAfterMs, 60_000)
  return err
}

/** Source side (connects). Resolves once the destination has said READY. */
export async function clientHandshake(ch: Channel, token: Buffer, info: HelloInfo): Promise<void> {
  const nonce = randomBytes(32)
  ch.send(encodeControl(Msg.HELLO, { proto: PROTOCOL_NAME, version: PROTOCOL_VERSION, ...info, nonce }))
  const hello = await ch.nextFrame().catch((err: UffdMigrateError) => {
    throw err.code === ErrorCode.PROTOCOL ? notADestination(err.message) : err
  })
  if (hello.type === Msg.ERROR) throw peerError(hello.payload)
  if (hello.type !== Msg.HELLO) throw notADestination(`expected HELLO, got message type ${hello.type}`)
  const m = decodeControl(hello.type, hello.payload)
  checkVersion(m)
  const peerNonce = field<Uint8Array>(m, 'nonce', 'bytes', 'HELLO')
  try {
    verify(handshakeProof(token, 'server', info, nonce, peerNonce), field<Uint8Array>(m, 'proof', 'bytes', 'HELLO'), 'the destination')
  } catch (err) {
    ch.sendError(err as UffdMigrateError)
    throw err
  }
  ch.send(encodeControl(Msg.AUTH, { proof: handshakeProof(token, 'client', info, peerNonce, nonce) }))
  const ready = await ch.nextFrame()
  if (ready.type === Msg.ERROR) throw peerError(ready.payload)
  if (ready.type !== Msg.READY) throw migrationError(ErrorCode.PROTOCOL, `expected READY, got message type ${ready.type}`)
  ch.authenticated()
}

/**
 * The address answered, but its first bytes are not a uffd-migrate HELLO (a web
 * server, a middlebox, a proxy that took a connection meant for a host that is
 * unreachable). A connect failure, not a protocol one: the address is wrong or
 * not ours yet, and post-copy recovery dials again until its deadline.
 */
function notADestination(detail: string): UffdMigrateError {
  return migrationError(ErrorCode.CONNECT, `the address answered, but not as a uffd-migrate destination (${detail}): is \`uffd-migrate receive\` listening there?`)
}

/**
 * Destination side (accepts). Resolves with the connection's role and
 * session. admit() may refuse an authenticated peer (busy) before READY, so
 * that the source hears it as the handshake's answer.
 */
export async function serverHandshake(ch: Channel, token: Buffer, admit: (info: HelloInfo) => void = () => {}): Promise<HelloInfo> {
  try {
    const hello = await ch.nextFrame()
    if (hello.type !== Msg.HELLO) throw migrationError(ErrorCode.PROTOCOL, `expected HELLO, got message type ${hello.type}`)
    const m = decodeControl(hello.type, hello.payload)
    checkVersion(m)
    const role = field<string>(m, 'role', 'string', 'HELLO')
    if (role !== 'urgent' && role !== 'bulk' && role !== 'demand' && role !== 'stream') throw migrationError(ErrorCode.PROTOCOL, `expected HELLO.role urgent|bulk|demand|stream, got ${role}`)
    const session = field<string>(m, 'session', 'string', 'HELLO')
    if (session.length > 64) throw migrationError(ErrorCode.PROTOCOL, 'expected HELLO.session of at most 64 characters')
    const info: HelloInfo = { role, session }
    const peerNonce = field<Uint8Array>(m, 'nonce', 'bytes', 'HELLO')
    if (peerNonce.length !== 32) throw migrationError(ErrorCode.PROTOCOL, 'expected a 32-byte HELLO.nonce')
    const nonce = randomBytes(32)
    ch.send(encodeControl(Msg.HELLO, { proto: PROTOCOL_NAME, version: PROTOCOL_VERSION, nonce, proof: handshakeProof(token, 'server', info, peerNonce, nonce) }))
    const auth = await ch.nextFrame()
    if (auth.type === Msg.ERROR) throw peerError(auth.payload)
    if (auth.type !== Msg.AUTH) throw migrationError(ErrorCode.PROTOCOL, `expected AUTH, got message type ${auth.type}`)
    verify(handshakeProof(token, 'client', info, nonce, peerNonce), field<Uint8Array>(decodeControl(auth.type, auth.payload), 'proof', 'bytes', 'AUTH'), 'the source')
    admit(info)
    ch.authenticated()
    ch.send(encodeControl(Msg.READY, {}))
    return info
  } catch (err) {
    if (err instanceof UffdMigrateError) ch.sendError(err) // (not the peer's own: sendError skips it)
    throw err
  }
}
