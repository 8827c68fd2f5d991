/**
 * Where the frames are in a relayed byte stream (src/testing/relay.ts): each connection's HELLO (its role and nonce),
 * every frame's type and offset across chunks, and, with the hosts' key log, the frames inside sealed records.
 */
import { readFileSync } from 'node:fs'
import { findKeys } from '../protocol/keylog'
import { decodeControl, Msg } from '../protocol/messages'
import { Opener, SEALED } from '../protocol/records'

/**
 * The source's HELLO, each connection's first frame towards the destination (plaintext, also in an encrypted
 * migration): the connection's role, and its nonce, which names the connection's keys in a key log.
 */
export class SourceHello {
  private head: Buffer | undefined = Buffer.alloc(0) // undefined: read (or not a HELLO)
  role: string | undefined
  nonce: Uint8Array | undefined

  /** The next chunk towards the destination (the first ones hold the HELLO). */
  see(chunk: Buffer): void {
    if (!this.head) return
    this.head = Buffer.concat([this.head, chunk])
    const len = this.head.length >= 5 ? this.head.readUInt32BE(0) : 0
    if (len > 1 << 16) return void (this.head = undefined) // not a HELLO
    if (this.head.length < 5 || this.head.length < 4 + len) return
    const h = this.head
    this.head = undefined
    if (h[4] !== Msg.HELLO) return
    try {
      const m = decodeControl(Msg.HELLO, h.subarray(5, 4 + len))
      if (typeof m.role === 'string') this.role = m.role
      if (m.nonce instanceof Uint8Array) this.nonce = m.nonce
    } catch {}
  }
}

/** A frame's 5-byte header gathered across chunks, and where in the chunk it began (negative: in an earlier one). */
class HeaderBytes {
  private head = Buffer.alloc(0)
  at = 0

  /** Takes header bytes from chunk at i: the offset after them, and the header once it is whole. */
  take(chunk: Buffer, i: number): { i: number; header?: Buffer } {
    if (this.head.length === 0) this.at = i
    const need = 5 - this.head.length
    this.head = Buffer.concat([this.head, chunk.subarray(i, i + need)])
    i += Math.min(need, chunk.length - i)
    if (this.head.length < 5) return { i }
    const header = this.head
    this.head = Buffer.alloc(0)
    return { i, header }
  }

  /** The chunk is done: offsets in it become the next one's (negative). */
  passed(chunk: Buffer): void {
    this.at -= chunk.length
  }
}

/** Walks one direction's plaintext frames across chunks: each frame's type, and where it begins in the chunk (negative: in an earlier one). */
export class FrameWalk {
  private skip = 0
  private readonly header = new HeaderBytes()

  each(chunk: Buffer, frame: (type: number, at: number) => void): void {
    for (let i = 0; i < chunk.length; ) {
      if (this.skip > 0) {
        const k = Math.min(this.skip, chunk.length - i)
        this.skip -= k
        i += k
        continue
      }
      const got = this.header.take(chunk, i)
      i = got.i
      if (!got.header) break
      frame(got.header[4], this.header.at)
      this.skip = got.header.readUInt32BE(0) - 1
    }
    this.header.passed(chunk)
  }
}

/** What the two directions of one relayed connection share. */
export interface WatchContext {
  hello?: SourceHello
  /** $UFFD_MIGRATE_KEYLOG of the hosts (keylog.ts), to see the frames inside a sealed stream. */
  keylog?: string
}

/**
 * Follows one direction's frames across chunks: `u32 length (type + payload) | u8 type | payload`. In a sealed stream
 * (an encrypted migration) with the hosts' key log, it opens each record and follows the frames inside: the break then
 * goes at a record's edge, before the record where the cued frame begins (lost: nothing of a record is used unless it
 * all arrives) or after the one where it ends.
 */
export class FrameWatch {
  private skip = 0 // bytes of the current frame still to pass
  private readonly head = new HeaderBytes() // a frame's first bytes, split across chunks
  private pendingEnd = -1 // a cued frame delivered whole: bytes of it still to pass before the break
  private kept: Buffer[] | undefined // the current frame's bytes, kept (a sealed record to open)
  private keptAt = 0 // where in the chunk the kept frame began (negative: in an earlier chunk)
  private opener: Opener | undefined
  private opened: Buffer[] = []
  private inner: FrameWatch | undefined // the frames inside the records
  private noKeys = false

  constructor(private readonly ctx: WatchContext = {}, private readonly toDestination = false) {}

  /** Offset in chunk where the break goes: before a frame of `type` (lose) or just after it, or undefined. */
  find(chunk: Buffer, type: number, lose: boolean): number | undefined {
    if (this.pendingEnd >= 0) {
      if (chunk.length >= this.pendingEnd) return this.pendingEnd
      this.pendingEnd -= chunk.length
      return undefined
    }
    let i = 0
    while (i < chunk.length) {
      if (this.skip > 0) {
        const k = Math.min(this.skip, chunk.length - i)
        this.kept?.push(chunk.subarray(i, i + k))
        this.skip -= k
        i += k
        if (this.skip === 0 && this.kept) {
          const at = this.whole(type, lose, i)
          if (at !== undefined) return at
        }
        continue
      }
      const got = this.head.take(chunk, i)
      i = got.i
      const header = got.header
      if (!header) break
      const len = header.readUInt32BE(0), frameType = header[4]
      if (frameType === SEALED && this.canOpen()) {
        this.kept = [header]
        this.keptAt = this.head.at
      } else if (frameType === type) {
        if (lose) return Math.max(0, this.head.at)
        const end = i + len - 1
        if (end <= chunk.length) return end
        this.pendingEnd = end - chunk.length
        return undefined
      }
      this.skip = len - 1
    }
    this.head.passed(chunk)
    this.keptAt -= chunk.length
    return undefined
  }

  /** The kept record is whole, ending at `end` in the chunk: the frames inside it. */
  private whole(type: number, lose: boolean, end: number): number | undefined {
    const frame = Buffer.concat(this.kept!)
    this.kept = undefined
    this.opened = []
    try {
      this.opener!.feed(frame)
    } catch {
      this.noKeys = true // (a record changed on the way, or keys of another run: the frames inside are not seen)
      return undefined
    }
    const plain = Buffer.concat(this.opened)
    if (this.inner!.find(plain, type, lose) === undefined) return undefined
    return lose ? Math.max(0, this.keptAt) : end
  }

  /** The keys of this connection are in the key log (read when its first record comes). */
  private canOpen(): boolean {
    if (this.opener) return true
    const nonce = this.ctx.hello?.nonce
    if (this.noKeys || !this.ctx.keylog || !nonce) return false
    let log = ''
    try {
      log = readFileSync(this.ctx.keylog, 'utf8')
    } catch {
      // not written yet
    }
    const keys = findKeys(log, nonce)
    if (!keys) return (this.noKeys = true), false
    this.opener = new Opener(this.toDestination ? keys.toServer : keys.toClient, (p) => this.opened.push(p), 'relay')
    this.inner = new FrameWatch()
    return true
  }
}
