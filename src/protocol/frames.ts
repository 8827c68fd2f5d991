/**
 * Sans-IO framing: `u32 length | u8 type | payload`, length counting type +
 * payload. feed() takes socket chunks and calls onFrame with each complete
 * frame; a frame larger than maxFrameBytes is a protocol error before any of
 * it is buffered. Payloads that arrived in one chunk are views, not copies.
 */
import { ErrorCode, migrationError } from '../errors'

export const FRAME_HEADER_BYTES = 5

export interface Frame {
  type: number
  payload: Buffer
}

export class FrameDecoder {
  private chunks: Buffer[] = []
  private buffered = 0
  private need = -1 // bytes of the current frame (type + payload) once its length is known

  constructor(
    private readonly onFrame: (frame: Frame) => void,
    /** Raised once a connection has authenticated (see Channel.authenticated()). */
    public maxFrameBytes: number,
  ) {}

  get bufferedBytes(): number {
    return this.buffered
  }

  /** Drops what is buffered (the connection failed). */
  clear(): void {
    this.chunks = []
    this.buffered = 0
    this.need = -1
  }

  /** Takes what is buffered, as the bytes that came off the wire (a partial frame, its length header included). */
  drainRaw(): Buffer {
    const parts = this.need >= 0 ? [frameLength(this.need), ...this.chunks] : this.chunks
    const out = Buffer.concat(parts)
    this.clear()
    return out
  }

  /** Part of a frame has arrived and the rest has not. */
  get midFrame(): boolean {
    return this.buffered > 0 || this.need >= 0
  }

  feed(chunk: Buffer): void {
    this.chunks.push(chunk)
    this.buffered += chunk.length
    for (;;) {
      if (this.need < 0) {
        if (this.buffered < 4) return
        const len = this.peekU32()
        if (len < 1 || len > this.maxFrameBytes + 1) {
          throw migrationError(
            ErrorCode.PROTOCOL,
            `expected a frame of 1..${this.maxFrameBytes + 1} bytes, got a length of ${len}`,
          )
        }
        this.take(4)
        this.need = len
      }
      if (this.buffered < this.need) return
      const body = this.take(this.need)
      this.need = -1
      this.onFrame({ type: body[0], payload: body.subarray(1) })
    }
  }

  private peekU32(): number {
    const first = this.chunks[0]
    if (first.length >= 4) return first.readUInt32BE(0)
    return Buffer.concat(this.chunks, Math.min(this.buffered, 4)).readUInt32BE(0)
  }

  /** Removes n bytes from the front; a view when they lie in one chunk. */
  private take(n: number): Buffer {
    this.buffered -= n
    const first = this.chunks[0]
    if (first.length > n) {
      this.chunks[0] = first.subarray(n)
      return first.subarray(0, n)
    }
    if (first.length === n) {
      this.chunks.shift()
      return first
    }
    const out = Buffer.allocUnsafe(n)
    let off = 0
    while (off < n) {
      const c = this.chunks[0]
      const k = Math.min(c.length, n - off)
      c.copy(out, off, 0, k)
      off += k
      if (k === c.length) this.chunks.shift()
      else this.chunks[0] = c.subarray(k)
    }
    return out
  }
}

function frameLength(n: number): Buffer {
  const b = Buffer.allocUnsafe(4)
  b.writeUInt32BE(n, 0)
  return b
}

/** The 5-byte header of a frame whose payload is `payloadBytes` long. */
export function frameHeader(type: number, payloadBytes: number): Buffer {
  const h = Buffer.allocUnsafe(FRAME_HEADER_BYTES)
  h.writeUInt32BE(payloadBytes + 1, 0)
  h[4] = type
  return h
}
