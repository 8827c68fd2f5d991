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
import { connect, createServer, type Server, type Socket } from 'node:net'
import { FrameWalk, FrameWatch, SourceHello, type WatchContext } from './relay-frames'
import { Msg } from '../protocol/messages'

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
   * Towards the destination, on a plaintext connection: once a frame of a type in `after` passed there, the byte
   * `offset` bytes into the next frame of `type` gets its top bit flipped, `times` times in all (default once; at most
   * once per arming): a changed byte that TCP's checksum missed, in a frame's header. `corrupted` counts them.
   */
  corruptFrame: { after: number[]; type: number; offset: number; times?: number } | undefined
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

  /**
   * A relay that never cuts and changes the region index of the first PAGES header after HANDOFF (its top byte: an
   * index past the table), and after each recovery's RECOVER, `times` times in all: what a plaintext link's TCP
   * checksum can miss, which both sides must take for a broken link after the hand-off (the soak's `corrupt`, recovery.e2e).
   */
  static corruptingPagesHeaders(times = 1): Relay {
    const r = new Relay(Infinity)
    r.corruptFrame = { after: [Msg.HANDOFF, Msg.RECOVER], type: Msg.PAGES, offset: 5, times }
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
      if (cf && this.corrupted < (cf.times ?? 1)) {
        walk.each(chunk, (type, at) => {
          if (cf.after.includes(type)) armed = true
          else if (armed && type === cf.type && this.corrupted < (cf.times ?? 1) && at >= 0 && at + cf.offset < chunk.length) {
            chunk = Buffer.from(chunk)
            chunk[at + cf.offset] ^= 0x80
            this.corrupted++
            armed = false
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

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

function canConnect(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(port, host)
    s.once('connect', () => (s.destroy(), resolve(true)))
    s.once('error', () => resolve(false))
  })
}
