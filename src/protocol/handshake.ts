/**
 * Mutual authentication of one connection with a shared token: each side
 * proves it holds the token with an HMAC over both fresh nonces, so the token
 * never crosses the wire and a recorded exchange cannot be replayed. Nothing
 * but HELLO/AUTH/READY/ERROR is accepted before READY.
 *
 * Each HELLO also carries an ephemeral X25519 public key and whether that side
 * wants the connection encrypted; the proofs cover both, so nobody on the path
 * can swap a key or turn encryption off. If either side wants it, everything
 * after the source's AUTH is sealed (records.ts) under keys derived from the
 * X25519 secret and the token: recorded traffic stays secret even if the token
 * leaks later.
 */
import { createHmac, createPublicKey, diffieHellman, generateKeyPairSync, hkdfSync, type KeyObject, randomBytes, timingSafeEqual } from 'node:crypto'
import { ErrorCode, migrationError, UffdMigrateError } from '../errors'
import type { Channel } from './channel'
import { decodeControl, encodeControl, field, Msg, PROTOCOL_NAME, PROTOCOL_VERSION } from './messages'
import type { DirectionKey } from './records'
import { logKeys } from './keylog'

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

/** What the handshake settled besides who the peer is. */
export interface Secured {
  /** Everything after the handshake is sealed (either side asked). */
  encrypted: boolean
}

/** Each side's X25519 public key and wish to encrypt, as both HELLOs carried them: what the proofs cover. */
export interface KeyExchange {
  clientKey: Uint8Array
  serverKey: Uint8Array
  clientEncrypt: boolean
  serverEncrypt: boolean
}

/** The HMAC one side sends to prove it holds the token (exported for the fuzzer, which writes raw handshakes). */
export function handshakeProof(token: Buffer, who: 'client' | 'server', info: HelloInfo, a: Uint8Array, b: Uint8Array, kx: KeyExchange): Buffer {
  return createHmac('sha256', token).update(`${PROTOCOL_NAME}/${who}/${info.role}/${info.session}/`).update(a).update(b)
    .update(kx.clientKey).update(kx.serverKey).update(Buffer.from([kx.clientEncrypt ? 1 : 0, kx.serverEncrypt ? 1 : 0])).digest()
}

// DER prefix of an X25519 SubjectPublicKeyInfo: the 32 raw key bytes follow
const X25519_SPKI_PREFIX = Buffer.from('302a300506032b656e032100', 'hex')

/** A fresh X25519 key pair for one handshake (exported for the fuzzer). */
export function ephemeralKey(): { publicKey: Buffer; privateKey: KeyObject } {
  const { publicKey, privateKey } = generateKeyPairSync('x25519')
  return { publicKey: publicKey.export({ format: 'der', type: 'spki' }).subarray(X25519_SPKI_PREFIX.length), privateKey }
}

function peerKey(m: Record<string, unknown>): Uint8Array {
  const key = field<Uint8Array>(m, 'key', 'bytes', 'HELLO')
  if (key.length !== 32) throw migrationError(ErrorCode.PROTOCOL, 'expected a 32-byte HELLO.key (X25519)')
  return key
}

/**
 * The connection's two direction keys: HKDF-SHA256 over the X25519 secret,
 * salted with the token, bound to the role, session and both nonces
 * (exported for the fuzzer, whose sealed sessions write raw records).
 */
export function connectionKeys(token: Buffer, own: KeyObject, peer: Uint8Array, info: HelloInfo, clientNonce: Uint8Array, serverNonce: Uint8Array): { toServer: DirectionKey; toClient: DirectionKey } {
  let secret: Buffer
  try {
    secret = diffieHellman({ privateKey: own, publicKey: createPublicKey({ key: Buffer.concat([X25519_SPKI_PREFIX, peer]), format: 'der', type: 'spki' }) })
  } catch (err) {
    throw migrationError(ErrorCode.PROTOCOL, `the peer's X25519 key is not usable: ${(err as Error).message}`)
  }
  const context = Buffer.concat([Buffer.from(`${PROTOCOL_NAME}/keys/${info.role}/${info.session}/`), clientNonce, serverNonce])
  const okm = Buffer.from(hkdfSync('sha256', secret, token, context, 88))
  return { toServer: { key: okm.subarray(0, 32), iv: okm.subarray(32, 44) }, toClient: { key: okm.subarray(44, 76), iv: okm.subarray(76, 88) } }
}

function wantsEncryption(m: Record<string, unknown>): boolean {
  return m.encrypt === true
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
  // every ERROR a peer sends names its code: one without is a frame no peer sends (bytes changed on the path), a
  // protocol error of this side's finding, which recovery takes after the hand-off, not the peer's refusal
  if (typeof m.code !== 'string') return migrationError(ErrorCode.PROTOCOL, `expected ERROR.code to be a string, got ${typeof m.code}`)
  const code = m.code
  const message = typeof m.message === 'string' ? m.message : 'no message'
  const err = new UffdMigrateError(`peer reported: ${message}`, code)
  err.fromPeer = true
  if (typeof m.retryAfterMs === 'number' && m.retryAfterMs >= 0) err.retryAfterMs = Math.min(m.retryAfterMs, 60_000)
  if (m.serviceStarted === false) err.serviceStarted = false
  return err
}

/**
 * Source side (connects). Resolves once the destination has said READY.
 * encrypt: this side wants the connection sealed (the destination may ask too).
 */
export async function clientHandshake(ch: Channel, token: Buffer, info: HelloInfo, encrypt = false): Promise<Secured> {
  const nonce = randomBytes(32)
  const own = ephemeralKey()
  ch.send(encodeControl(Msg.HELLO, { proto: PROTOCOL_NAME, version: PROTOCOL_VERSION, ...info, nonce, key: own.publicKey, encrypt }))
  const hello = await ch.nextFrame().catch((err: UffdMigrateError) => {
    throw err.code === ErrorCode.PROTOCOL ? notADestination(err.message) : err
  })
  if (hello.type === Msg.ERROR) throw peerError(hello.payload)
  if (hello.type !== Msg.HELLO) throw notADestination(`expected HELLO, got message type ${hello.type}`)
  const m = decodeControl(hello.type, hello.payload)
  checkVersion(m)
  const peerNonce = field<Uint8Array>(m, 'nonce', 'bytes', 'HELLO')
  let kx: KeyExchange
  try {
    kx = { clientKey: own.publicKey, serverKey: peerKey(m), clientEncrypt: encrypt, serverEncrypt: wantsEncryption(m) }
    verify(handshakeProof(token, 'server', info, nonce, peerNonce, kx), field<Uint8Array>(m, 'proof', 'bytes', 'HELLO'), 'the destination')
  } catch (err) {
    ch.sendError(err as UffdMigrateError)
    throw err
  }
  const encrypted = kx.clientEncrypt || kx.serverEncrypt
  const keys = encrypted ? connectionKeys(token, own.privateKey, kx.serverKey, info, nonce, peerNonce) : undefined
  if (keys) logKeys(nonce, keys) // (before AUTH: the first sealed bytes follow it)
  ch.send(encodeControl(Msg.AUTH, { proof: handshakeProof(token, 'client', info, peerNonce, nonce, kx) }))
  // the destination answers AUTH sealed: READY, or its refusal (busy)
  if (keys) ch.secure({ send: keys.toServer, receive: keys.toClient })
  ch.authenticatedAfter(Msg.READY)
  const ready = await ch.nextFrame()
  if (ready.type === Msg.ERROR) throw peerError(ready.payload)
  if (ready.type !== Msg.READY) throw migrationError(ErrorCode.PROTOCOL, `expected READY, got message type ${ready.type}`)
  ch.authenticated()
  return { encrypted }
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
 * that the source hears it as the handshake's answer. encrypt: this side
 * insists on a sealed connection, whatever the source asked.
 */
export async function serverHandshake(ch: Channel, token: Buffer, admit: (info: HelloInfo) => void = () => {}, encrypt = false): Promise<HelloInfo & Secured> {
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
    const own = ephemeralKey()
    const kx: KeyExchange = { clientKey: peerKey(m), serverKey: own.publicKey, clientEncrypt: wantsEncryption(m), serverEncrypt: encrypt }
    ch.send(encodeControl(Msg.HELLO, { proto: PROTOCOL_NAME, version: PROTOCOL_VERSION, nonce, proof: handshakeProof(token, 'server', info, peerNonce, nonce, kx), key: own.publicKey, encrypt }))
    const auth = await ch.nextFrame()
    if (auth.type === Msg.ERROR) throw peerError(auth.payload)
    if (auth.type !== Msg.AUTH) throw migrationError(ErrorCode.PROTOCOL, `expected AUTH, got message type ${auth.type}`)
    verify(handshakeProof(token, 'client', info, nonce, peerNonce, kx), field<Uint8Array>(decodeControl(auth.type, auth.payload), 'proof', 'bytes', 'AUTH'), 'the source')
    const encrypted = kx.clientEncrypt || kx.serverEncrypt
    if (encrypted) {
      const keys = connectionKeys(token, own.privateKey, kx.clientKey, info, peerNonce, nonce)
      logKeys(peerNonce, keys)
      ch.secure({ send: keys.toClient, receive: keys.toServer }, info.role)
    }
    admit(info)
    ch.authenticated()
    ch.send(encodeControl(Msg.READY, {}))
    return { ...info, encrypted }
  } catch (err) {
    if (err instanceof UffdMigrateError) ch.sendError(err) // (not the peer's own: sendError skips it)
    throw err
  }
}
