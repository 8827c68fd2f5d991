/**
 * A TCP relay between a source and a destination that breaks the link once, on cue (tests and the soak):
 * - a reset: every open connection reset at once, both ways (a failing switch, a restarted firewall), or towards the
 *   source only (`oneSided`: the destination's side of each connection stays open and silent, as after a reset that
 *   reached one host, or a partition the source noticed first);
 * - a silence (`silentMs`): nothing forwarded either way and no new connection through for that long, then the link
 *   is back as it was (a partition that heals; whatever timed out meanwhile dials again).
 * The cue: so many bytes towards the destination, or a frame of a given type (`u32 length | u8 type | payload`
 * from each connection's first byte) going either way, lost with the link or delivered just before it breaks; in an
 * encrypted migration, with the hosts' key log ($UFFD_MIGRATE_KEYLOG), the frames inside the sealed records.
 */
import { readFileSync } from 'node:fs'
import { connect, createServer, type Server, type Socket } from 'node:net'
import { findKeys } from '../protocol/keylog'
import { decodeControl, Msg } from '../protocol/messages'
import { Opener, SEALED } from '../protocol/records'

/** Break the link when a frame of this type passes: `toDestination` or back (undefined: either way); `lose`: before it (it never arrives). */
export interface FrameCue {
  type: number
  toDestination?: boolean
  lose: boolean
}

/** Forwards to host:port; breaks the link once, when `cutAfterBytes` went towards the destination (or on `onFrame`). */
export class Relay {
  private server: Server | undefined
  private readonly open = new Set<Socket>()
  private readonly clients = new WeakSet<Socket>()
  private silentUntilMs = 0
  private readonly waiting: (() => void)[] = [] // what waits for a silence to end
  bytesToDestination = 0
  cuts = 0
  connections = 0
  /** Where the break came: bytes towards the destination by then. */
  cutAtBytes: number | undefined

  /**
   * cutAfterBytes: break once that much went towards the destination;
   * cutOnType: or when a frame of this type comes back from the destination (that frame is lost with the link).
   */
  constructor(private readonly cutAfterBytes: number, private readonly refuseAfterCut = false, cutOnType?: number) {
    if (cutOnType !== undefined) this.onFrame = { type: cutOnType, toDestination: false, lose: true }
  }

  /** The break resets the source's side only; the destination's stays open, nothing more forwarded either way. */
  oneSided = false

  /** The break is a silence of this long instead of a reset (0: a reset). */
  silentMs = 0

  /** A reset on a frame cue comes this long after the bytes before it left (0: at once; it may then lose them too). */
  resetDelayMs = 100

  /** Break on this frame (and not on a byte count unless cutAfterBytes is finite too). */
  onFrame: FrameCue | undefined

  /** Towards the destination at most this many bytes per second (0: as fast as it goes). */
  rateBytesPerSec = 0

  /**
   * The hosts' $UFFD_MIGRATE_KEYLOG (src/protocol/keylog.ts): with it a frame cue finds its frame inside an encrypted
   * migration's sealed records too (the break then comes at a record's edge).
   */
  keylog: string | undefined = process.env.UFFD_MIGRATE_KEYLOG

  /** Sees every chunk it forwards, as it goes (a wiretap: what someone on the path reads). */
  tap: ((chunk: Buffer, toDestination: boolean) => void) | undefined

  /** Flips one bit of the byte at this offset of the bytes towards the destination (all connections counted), once: someone on the path changing data. */
  corruptAtByte = Infinity

  /**
   * Towards the destination, on a plaintext connection: once a frame of type `after` passed there, the byte `offset`
   * bytes into the next frame of `type` gets its top bit flipped, once in all: a changed byte that TCP's checksum
   * missed, in a frame's header. `corrupted` counts it.
   */
  corruptFrame: { after: number; type: number; offset: number } | undefined
  corrupted = 0

  /**
   * Connections of this role (as their HELLO names it: bulk, stream...) carry what goes towards the destination this
   * many ms late, in order: one connection behind the others, as a congested path or a slow NIC queue makes it. What
   * the source sends on parallel streams then arrives in another order than it was sent.
   */
  lagToDestination: { role: string; ms: number } | undefined

  /** A relay that never cuts and carries at most bytesPerSec towards the destination: a slow link, so that rounds last. */
  static slow(bytesPerSec: number): Relay {
    const r = new Relay(Infinity)
    r.rateBytesPerSec = bytesPerSec
    return r
  }

  /** Listens on listenHost (an ephemeral port) for the source; its address as host:port. */
  async start(host: string, port: number, listenHost = '127.0.0.1'): Promise<string> {
    // the destination may not listen yet (the source would retry a refused
    // connection, but the relay accepts it and would then drop it)
    for (const end = Date.now() + 5000; !(await canConnect(host, port)) && Date.now() < end; ) await sleep(50)
    this.server = createServer((client) => {
      if (this.refuseAfterCut && this.cuts > 0) return client.destroy()
      this.connections++
      this.clients.add(client)
      this.open.add(client)
      client.on('close', () => this.open.delete(client))
      client.on('error', () => {})
      client.pause()
      // a silent link: the connection waits as an unanswered SYN would
      this.afterSilence(() => !client.destroyed && this.forward(client, connect(port, host)))
    })
    return new Promise((resolve) => this.server!.listen(0, listenHost, () => resolve(`${listenHost}:${(this.server!.address() as { port: number }).port}`)))
  }

  private forward(client: Socket, upstream: Socket): void {
    // as the endpoints do: Nagle's wait for a delayed ACK added ~40 ms to a hand-off's small frames
    client.setNoDelay(true)
    upstream.setNoDelay(true)
    this.open.add(upstream)
    upstream.on('close', () => this.open.delete(upstream))
    upstream.on('error', () => {})
    const hello = new SourceHello()
    const ctx: WatchContext = { keylog: this.keylog, hello }
    const toDest = new FrameWatch(ctx, true), back = new FrameWatch(ctx, false)
    const walk = new FrameWalk()
    let armed = false
    client.on('data', (chunk: Buffer) => {
      hello.see(chunk)
      const cf = this.corruptFrame
      if (cf && this.corrupted === 0) {
        walk.each(chunk, (type, at) => {
          if (type === cf.after) armed = true
          else if (armed && type === cf.type && this.corrupted === 0 && at >= 0 && at + cf.offset < chunk.length) {
            chunk = Buffer.from(chunk)
            chunk[at + cf.offset] ^= 0x80
            this.corrupted++
          }
        })
      }
      const at = this.cueIn(toDest, chunk, true)
      if (at !== undefined) return this.cutAt(upstream, chunk, at, true)
      const flip = this.corruptAtByte - this.bytesToDestination
      if (flip >= 0 && flip < chunk.length) (chunk = Buffer.from(chunk))[flip] ^= 0x10
      this.tap?.(chunk, true)
      // (timers of one duration fire in the order they were set: the lagging connection's bytes stay in order)
      const lag = this.lagToDestination
      if (lag && hello.role === lag.role) setTimeout(() => void (!upstream.destroyed && upstream.write(chunk)), lag.ms)
      else upstream.write(chunk)
      this.bytesToDestination += chunk.length
      if (this.rateBytesPerSec > 0) {
        client.pause()
        setTimeout(() => client.resume(), (chunk.length / this.rateBytesPerSec) * 1000)
      }
      if (this.cuts === 0 && this.bytesToDestination >= this.cutAfterBytes) this.cut()
    })
    upstream.on('data', (chunk: Buffer) => {
      const at = this.cueIn(back, chunk, false)
      if (at !== undefined) return this.cutAt(client, chunk, at, false)
      this.tap?.(chunk, false)
      client.write(chunk)
    })
    client.on('close', () => (this.oneSided && this.cuts > 0 ? upstream.pause() : upstream.destroy()))
    upstream.on('close', () => client.destroy())
    client.resume()
  }

  /** Where in this chunk the link breaks for the frame cue (the bytes before it pass), or undefined. */
  private cueIn(watch: FrameWatch, chunk: Buffer, toDestination: boolean): number | undefined {
    const cue = this.onFrame
    if (!cue || this.cuts > 0 || (cue.toDestination !== undefined && cue.toDestination !== toDestination)) return undefined
    return watch.find(chunk, cue.type, cue.lose)
  }

  /**
   * The frame cue met in this chunk, `at` bytes in, on its way out through `to`: the bytes before it pass, then the
   * link breaks. A silence delivers the rest once it ends (TCP loses nothing on a connection that lives); a reset loses
   * it, and comes once what passed had time to leave this host (a reset discards what the kernel has not sent yet).
   */
  private cutAt(to: Socket, chunk: Buffer, at: number, toDestination: boolean): void {
    const passed = chunk.subarray(0, at), rest = chunk.subarray(at)
    if (toDestination) this.bytesToDestination += passed.length
    if (this.silentMs > 0) {
      to.write(passed)
      this.cut()
      return this.afterSilence(() => void (!to.destroyed && to.write(rest)))
    }
    for (const s of this.open) s.pause()
    this.markCut() // nothing else cuts meanwhile
    to.write(passed, () => setTimeout(() => this.reset(), passed.length > 0 ? this.resetDelayMs : 0))
  }

  /** The break: every connection reset at once, both ways (oneSided: the source's side only), or a silence. */
  private cut(): void {
    if (this.cuts > 0) return
    this.markCut()
    if (this.silentMs > 0) return this.silence()
    this.reset()
  }

  private markCut(): void {
    this.cuts++
    this.cutAtBytes = this.bytesToDestination
  }

  private reset(): void {
    for (const s of this.open) if (!this.oneSided || this.clients.has(s)) s.resetAndDestroy()
  }

  private silence(): void {
    this.silentUntilMs = Date.now() + this.silentMs
    for (const s of this.open) s.pause()
    setTimeout(() => {
      this.silentUntilMs = 0
      for (const go of this.waiting.splice(0)) go() // (before the sockets read again: what was held goes first)
      for (const s of this.open) s.resume()
    }, this.silentMs).unref()
  }

  private afterSilence(go: () => void): void {
    if (Date.now() < this.silentUntilMs) this.waiting.push(go)
    else go()
  }

  close(): void {
    this.server?.close()
    for (const s of this.open) s.destroy()
  }
}

/**
 * The source's HELLO, each connection's first frame towards the destination (plaintext, also in an encrypted
 * migration): the connection's role, and its nonce, which names the connection's keys in a key log.
 */
class SourceHello {
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

/** Walks one direction's plaintext frames across chunks: each frame's type, and where it begins in the chunk (negative: in an earlier one). */
class FrameWalk {
  private skip = 0
  private head = Buffer.alloc(0)
  private headAt = 0

  each(chunk: Buffer, frame: (type: number, at: number) => void): void {
    let i = 0
    while (i < chunk.length) {
      if (this.skip > 0) {
        const k = Math.min(this.skip, chunk.length - i)
        this.skip -= k
        i += k
        continue
      }
      if (this.head.length === 0) this.headAt = i
      const need = 5 - this.head.length
      this.head = Buffer.concat([this.head, chunk.subarray(i, i + need)])
      i += Math.min(need, chunk.length - i)
      if (this.head.length < 5) break
      frame(this.head[4], this.headAt)
      this.skip = this.head.readUInt32BE(0) - 1
      this.head = Buffer.alloc(0)
    }
    this.headAt -= chunk.length
  }
}

/** What the two directions of one relayed connection share. */
interface WatchContext {
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
class FrameWatch {
  private skip = 0 // bytes of the current frame still to pass
  private head = Buffer.alloc(0) // a frame's first bytes, split across chunks
  private headAt = 0 // where in the chunk that split header began (negative: in an earlier chunk)
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
      if (this.head.length === 0) this.headAt = i
      const need = 5 - this.head.length
      this.head = Buffer.concat([this.head, chunk.subarray(i, i + need)])
      i += Math.min(need, chunk.length - i)
      if (this.head.length < 5) break
      const header = this.head
      const len = header.readUInt32BE(0), frameType = header[4]
      this.head = Buffer.alloc(0)
      if (frameType === SEALED && this.canOpen()) {
        this.kept = [header]
        this.keptAt = this.headAt
      } else if (frameType === type) {
        if (lose) return Math.max(0, this.headAt)
        const end = i + len - 1
        if (end <= chunk.length) return end
        this.pendingEnd = end - chunk.length
        return undefined
      }
      this.skip = len - 1
    }
    this.headAt -= chunk.length
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

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

function canConnect(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(port, host)
    s.once('connect', () => (s.destroy(), resolve(true)))
    s.once('error', () => resolve(false))
  })
}
