/**
 * Sealed records: what an encrypted connection (`encrypt`) carries after its
 * handshake, each way. A record is a frame of type SEALED, `u32 length | u8
 * 0xE0 | ciphertext | 16-byte tag`, AES-256-GCM under the direction's key
 * (handshake.ts derives one per connection and direction), its 5-byte header
 * authenticated as associated data. The nonce is the direction's IV XOR the
 * record's sequence number, so a record changed, dropped, repeated, reordered
 * or moved to another connection fails its tag, and nothing of it is used.
 * Keys rotate every REKEY_BYTES of plaintext, well inside AES-GCM's limits.
 */
import { createCipheriv, createDecipheriv, hkdfSync } from 'node:crypto'
import { ErrorCode, migrationError, type UffdMigrateError } from '../errors'
import { type Frame, FrameDecoder, frameHeader } from './frames'

export const SEALED = 0xe0
/** The most plaintext one record holds: what a receiver buffers before it can check a tag. */
export const MAX_RECORD_PLAINTEXT = 256 << 10
export const TAG_BYTES = 16
/** Plaintext under one key before both sides derive the next (64 GiB). */
export const REKEY_BYTES = 2 ** 36

export interface DirectionKey {
  key: Buffer
  iv: Buffer
}

/** Where one direction stands, for the native thread that takes it over (native/records.h). */
export interface SealState {
  key: Buffer
  iv: Buffer
  /** The next record's sequence number. */
  seq: number
  bytesUnderKey: number
  rekeyBytes: number
}

/** One direction's key, sequence number and rotation, kept in step on both ends. */
class Direction {
  private key: Buffer
  private readonly iv: Buffer
  private seq = 0
  private bytesUnderKey = 0

  constructor(
    k: DirectionKey,
    private readonly rekeyBytes: number,
  ) {
    this.key = Buffer.from(k.key)
    this.iv = Buffer.from(k.iv)
  }

  /** The next record's nonce: IV XOR the 64-bit sequence number (its last 8 bytes). */
  nextNonce(): Buffer {
    if (this.spent) throw new Error('this direction was handed to a native thread')
    const n = Buffer.from(this.iv)
    const hi = Math.floor(this.seq / 2 ** 32), lo = this.seq % 2 ** 32
    n.writeUInt32BE((n.readUInt32BE(4) ^ hi) >>> 0, 4)
    n.writeUInt32BE((n.readUInt32BE(8) ^ lo) >>> 0, 8)
    this.seq++
    return n
  }

  get current(): Buffer {
    return this.key
  }

  /** Where it stands; it is not used again (a native thread goes on from there). */
  handOff(): SealState {
    this.spent = true
    return { key: Buffer.from(this.key), iv: Buffer.from(this.iv), seq: this.seq, bytesUnderKey: this.bytesUnderKey, rekeyBytes: this.rekeyBytes }
  }

  spent = false

  /** A record of `bytes` went through: past the limit, both ends derive the next key at the same record. */
  count(bytes: number): void {
    this.bytesUnderKey += bytes
    if (this.bytesUnderKey < this.rekeyBytes) return
    this.key = Buffer.from(hkdfSync('sha256', this.key, Buffer.alloc(0), 'uffd-migrate/rekey', 32))
    this.bytesUnderKey = 0
  }
}

/** The error is a record that failed its tag, or bytes that are not one (Opener): the other connections may still carry the reason. */
export function isIntegrityFailure(err: Error): boolean {
  return (err as { integrity?: boolean }).integrity === true
}

/** A record on `connection` failed its tag (here, or in the native thread that opens it). */
export function integrityError(connection: string): UffdMigrateError {
  // a broken link, not a protocol error: after the hand-off the source dials again, on fresh keys
  return Object.assign(migrationError(ErrorCode.CONNECTION,
    `a record on the encrypted ${connection} connection failed its integrity check: its bytes were changed, dropped or replayed between the hosts (a faulty middlebox, or an attacker on the path); nothing of it was used`), { integrity: true })
}

/**
 * Something other than a sealed record (a plaintext frame, a record shorter than its tag, or one longer than allowed)
 * where a record was due. The peer authenticated and seals everything after its handshake, so these bytes were changed
 * on the path like a record whose tag fails: a broken link too (after the hand-off the source dials again), not a
 * protocol error that ends the migration (a bit flipped in a record's header did, after the hand-off: found by the
 * source-side fuzzer).
 */
export function notARecordError(connection: string, what: string): UffdMigrateError {
  return Object.assign(migrationError(ErrorCode.CONNECTION,
    `expected a sealed record on the encrypted ${connection} connection, got ${what}: its bytes were changed between the hosts (a faulty middlebox, or an attacker on the path); nothing of it was used`), { integrity: true })
}

/** Seals what one side writes. */
export class Sealer {
  private readonly dir: Direction

  constructor(k: DirectionKey, rekeyBytes = REKEY_BYTES) {
    this.dir = new Direction(k, rekeyBytes)
  }

  /** Where this direction stands, for the native thread that seals from now on; seal() is not called again. */
  handOff(): SealState {
    return this.dir.handOff()
  }

  /** A native thread seals this direction now. */
  get handedOff(): boolean {
    return this.dir.spent
  }

  /** parts (one frame, or several) as sealed records, in order; each holds at most MAX_RECORD_PLAINTEXT. */
  seal(parts: Buffer[]): Buffer[] {
    const out: Buffer[] = []
    let total = 0
    for (const p of parts) total += p.length
    let i = 0, off = 0
    while (total > 0) {
      const n = Math.min(total, MAX_RECORD_PLAINTEXT)
      const header = frameHeader(SEALED, n + TAG_BYTES)
      const cipher = createCipheriv('aes-256-gcm', this.dir.current, this.dir.nextNonce())
      cipher.setAAD(header)
      out.push(header)
      for (let left = n; left > 0; ) {
        const p = parts[i]
        const k = Math.min(p.length - off, left)
        out.push(cipher.update(p.subarray(off, off + k)))
        off += k
        left -= k
        if (off === p.length) (i++, (off = 0))
      }
      cipher.final()
      out.push(cipher.getAuthTag())
      this.dir.count(n)
      total -= n
    }
    return out
  }
}

/**
 * Opens what the peer wrote: feed() takes socket chunks and hands the
 * plaintext of each whole record whose tag holds to `plaintext`, in order.
 * A record that fails is an error (thrown from feed()) and nothing of it is passed on.
 */
export class Opener {
  private readonly dir: Direction
  private readonly records: FrameDecoder

  constructor(
    k: DirectionKey,
    private readonly plaintext: (chunk: Buffer) => void,
    private readonly connection: string,
    rekeyBytes = REKEY_BYTES,
  ) {
    this.dir = new Direction(k, rekeyBytes)
    this.records = new FrameDecoder((f) => this.open(f), MAX_RECORD_PLAINTEXT + TAG_BYTES)
  }

  feed(chunk: Buffer): void {
    try {
      this.records.feed(chunk)
    } catch (err) {
      // what the opened plaintext broke is the peer's (a protocol error); the record framing's own refusal (a length
      // past the limit) is the path's, as a failed tag is
      if (err === this.plaintextError || isIntegrityFailure(err as Error)) throw err
      throw notARecordError(this.connection, `a length past the limit (${(err as Error).message})`)
    }
  }

  /** What the frame stream threw while it took a record's plaintext (the peer's error, not the record layer's). */
  private plaintextError: unknown

  /** Part of a record has arrived and the rest has not. */
  get midRecord(): boolean {
    return this.records.midFrame
  }

  /** Where this direction stands and the bytes of a record begun, for the native thread that opens from now on. */
  handOff(): { state: SealState; partial: Buffer } {
    return { state: this.dir.handOff(), partial: this.records.drainRaw() }
  }

  private open(f: Frame): void {
    if (f.type !== SEALED) throw notARecordError(this.connection, `a frame of type ${f.type}`)
    if (f.payload.length <= TAG_BYTES) throw notARecordError(this.connection, `a record of ${f.payload.length} bytes, shorter than its tag`)
    const body = f.payload.length - TAG_BYTES
    const decipher = createDecipheriv('aes-256-gcm', this.dir.current, this.dir.nextNonce())
    decipher.setAAD(frameHeader(SEALED, f.payload.length))
    decipher.setAuthTag(f.payload.subarray(body))
    const out = decipher.update(f.payload.subarray(0, body))
    try {
      decipher.final()
    } catch {
      throw integrityError(this.connection)
    }
    this.dir.count(body)
    try {
      this.plaintext(out)
    } catch (err) {
      this.plaintextError = err
      throw err
    }
  }
}
