/**
 * One connection of a migration: framing, backpressure and errors. The only
 * wrapper of a socket: the engines see frames, pauseReading()/resumeReading()
 * and drain(), never the socket. The transport is anything shaped like a
 * net.Socket (a TCP socket in production, an in-memory pair in the pure tier).
 * The protocol logic stays in the engines; this only moves frames.
 */
import { deadline, realTimers } from '../deadline'
import { ErrorCode, linkErrnoMeaning, migrationError, UffdMigrateError } from '../errors'
import { socketFd, takeSocket } from '../socket-fd'
import { type Frame, FrameDecoder, frameHeader } from './frames'
import { encodeControl, MAX_CONTROL_BYTES, MAX_HANDSHAKE_FRAME_BYTES, Msg } from './messages'
import { type DirectionKey, Opener, type SealState, Sealer } from './records'
import type { FrameWriter, Transport } from './transport'

export type { FrameWriter, Transport } from './transport'

export class Channel {
  private readonly decoder: FrameDecoder
  private handler: ((f: Frame) => void) | undefined
  private queued: Frame[] = []
  private waiters: { resolve: (f: Frame) => void; reject: (e: Error) => void }[] = []
  private failure: Error | undefined
  private closeListeners: ((err: Error) => void)[] = []
  /** The descriptor went to a native thread (handOver()): nothing is decoded here any more. */
  private handedOver = false
  /** Reading stopped because frames wait that nobody asked for yet (before the handshake is done). */
  private heldBack = false
  private bytesReadHere = 0
  /** Bytes a native thread read from the descriptor after handOver() (see readBy()). */
  private readElsewhere: (() => number) | undefined
  private bytesWrittenHere = 0
  /** Writes go through this instead of the socket (useWriter()). */
  private writer: FrameWriter | undefined
  /** An encrypted connection (secure()): what is written is sealed, what is read opened, before the framing. */
  private sealer: Sealer | undefined
  private opener: Opener | undefined
  /**
   * A write that cannot drain for this long means the peer stopped reading
   * (stopped, wedged): the connection fails as broken (0: wait forever).
   */
  stallTimeoutMs = 0
  /** What every ERROR this side sends on the connection says besides its code and message (its state, as the owner sees it). */
  errorFields: (() => Record<string, unknown> | undefined) | undefined
  /**
   * Whether a frame the handler refused is answered with ERROR before the connection fails (absent: it is). An owner
   * that takes such a failure for a broken link says no: the peer then sees the connection end, which it recovers
   * from, not a reason that ends the migration.
   */
  tellsRefusal: ((err: Error) => boolean) | undefined

  constructor(
    private readonly socket: Transport,
    readonly name: string,
  ) {
    socket.setNoDelay?.(true)
    // until authenticated() a frame is at most a handshake message: an unauthenticated peer costs a few KiB
    this.decoder = new FrameDecoder((f) => this.dispatch(f), MAX_HANDSHAKE_FRAME_BYTES)
    socket.on('data', (chunk: Buffer) => {
      // a failed connection reads nothing more: what a hostile peer keeps sending is dropped, not buffered
      if (this.failure || this.handedOver) return
      this.bytesReadHere += chunk.length
      try {
        if (this.opener) this.opener.feed(chunk)
        else this.decoder.feed(chunk)
      } catch (err) {
        this.fail(err as Error)
      }
    })
    socket.on('error', (err: NodeJS.ErrnoException) =>
      this.fail(migrationError(ErrorCode.CONNECTION, `${name} connection failed: ${err.message}${linkErrnoMeaning(err.code)}`, err)))
    socket.on('close', () => this.fail(migrationError(ErrorCode.CONNECTION, `${name} connection closed by the peer`)))
  }

  /** Bytes read from the peer, here and by the native thread that took the connection over (the stuck-peer watchdog reads it). */
  get bytesRead(): number {
    return this.bytesReadHere + (this.readElsewhere?.() ?? 0)
  }

  /** After handOver(): what the native thread read counts as read on this connection. */
  readBy(count: () => number): void {
    this.readElsewhere = count
  }

  /** The handshake succeeded: frames up to the control-message limit from now on. */
  authenticated(): void {
    this.decoder.maxFrameBytes = MAX_CONTROL_BYTES
  }

  /**
   * The peer's last handshake frame is due (the source awaits READY): frames after it may be as large as any control
   * message, also in its chunk (after a recovery the destination's demand thread asks again at once, in READY's chunk).
   */
  authenticatedAfter(type: number): void {
    this.liftLimitOn = type
  }

  private liftLimitOn: number | undefined

  /** Part of a frame has arrived and the rest has not. */
  get midFrame(): boolean {
    return this.decoder.midFrame || (this.opener?.midRecord ?? false)
  }

  /**
   * Everything from now on is sealed with `send` and opened with `receive`
   * (records.ts): called by the handshake where each side's plaintext ends.
   * A native thread that takes such a connection over seals and opens it
   * itself (native/records.h): handOver() refuses, handOverSealed() and
   * useWriter() give it where each direction stands.
   */
  secure(keys: { send: DirectionKey; receive: DirectionKey }, role = this.name): void {
    if (this.decoder.midFrame || this.queued.length) throw migrationError(ErrorCode.PROTOCOL, `${role} connection: the peer sent more than its handshake before the encrypted part began`)
    this.sealer = new Sealer(keys.send)
    this.opener = new Opener(keys.receive, (plain) => this.decoder.feed(plain), role)
  }

  /** The connection is encrypted (secure()). */
  get sealed(): boolean {
    return this.sealer !== undefined
  }

  /** Frames go to `handler` from now on (after the handshake). */
  onFrame(handler: (f: Frame) => void): void {
    this.handler = handler
    const q = this.queued
    this.queued = []
    this.releaseHold()
    for (const f of q) this.safeDispatch(f)
  }

  /** The peer's last ERROR, whoever took it (a waiter, the handler): its reason outlives a reader that was given up. */
  peerErrorFrame: Frame | undefined

  onClose(listener: (err: Error) => void): void {
    if (this.failure) listener(this.failure)
    else this.closeListeners.push(listener)
  }

  /** The next frame, for the handshake. */
  nextFrame(): Promise<Frame> {
    if (this.failure) return Promise.reject(this.failure)
    const f = this.queued.shift()
    if (!this.queued.length) this.releaseHold()
    if (f) return Promise.resolve(f)
    return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }))
  }

  private dispatch(f: Frame): void {
    if (this.failure) return
    if (f.type === Msg.ERROR) this.peerErrorFrame = f
    if (f.type === this.liftLimitOn) {
      this.liftLimitOn = undefined
      this.authenticated()
    }
    const w = this.waiters.shift()
    if (w) w.resolve(f)
    else if (this.handler) this.safeDispatch(f)
    else {
      // nobody asked for it yet: stop reading, so that a peer running ahead
      // of the handshake is held by TCP, not buffered here
      this.queued.push(f)
      if (!this.heldBack) {
        this.heldBack = true
        this.pauseReading()
      }
    }
  }

  private releaseHold(): void {
    if (!this.heldBack) return
    this.heldBack = false
    this.resumeReading()
  }

  private safeDispatch(f: Frame): void {
    try {
      this.handler!(f)
    } catch (err) {
      if (this.tellsRefusal?.(err as Error) !== false) this.sendError(err as Error)
      this.fail(err as Error)
    }
  }

  /** Stops delivering frames until resumeReading() (the kernel buffers, then the peer waits). */
  pauseReading(): void {
    if (!this.socket.isPaused()) this.socket.pause()
  }

  resumeReading(): void {
    if (this.socket.isPaused()) this.socket.resume()
  }

  get readingPaused(): boolean {
    return this.socket.isPaused()
  }

  /** Bytes written to the peer (by the socket, and by the writer since useWriter()). */
  get bytesWritten(): number {
    return this.bytesWrittenHere + (this.writer?.bytesWritten ?? 0)
  }

  /** Writes one frame made of buffers; false means "wait for drain()". */
  send(parts: Buffer[] | Buffer): boolean {
    if (this.failure || this.socket.destroyed) return false
    if (this.writer) {
      this.writer.write(Buffer.isBuffer(parts) ? parts : Buffer.concat(parts))
      return !this.writer.needsDrain
    }
    if (this.sealer?.handedOff) return false // (its thread writes: nothing more from here, as after handOver())
    if (this.sealer) parts = this.sealer.seal(Buffer.isBuffer(parts) ? [parts] : parts)
    if (Buffer.isBuffer(parts)) {
      this.bytesWrittenHere += parts.length
      return this.socket.write(parts)
    }
    let ok = true
    this.socket.cork()
    for (const p of parts) {
      this.bytesWrittenHere += p.length
      ok = this.socket.write(p)
    }
    this.socket.uncork()
    return ok
  }

  /**
   * From now on every frame goes through make(fd)'s writer (a native thread
   * that writes the descriptor); the socket is still read here. Refused
   * (undefined) while the socket has unwritten bytes (they would come after the
   * writer's) or has no descriptor. A sealed connection hands its sending
   * direction over with it (seal): the writer must seal from there on.
   */
  useWriter(make: (fd: number, seal: SealState | undefined) => FrameWriter): FrameWriter | undefined {
    const fd = this.fd
    if (fd === undefined || this.failure || this.writer || (this.socket as { writableLength?: number }).writableLength) return undefined
    this.writer = make(fd, this.sealer?.handOff())
    return this.writer
  }

  /** The writer of useWriter(), if any. */
  get frameWriter(): FrameWriter | undefined {
    return this.writer
  }

  /**
   * Sets an option of this connection's socket (apply: one of the addon's
   * setters, src/agent/socket-settings.ts), if it has a descriptor and has
   * not failed.
   */
  tune(apply: (fd: number) => unknown): void {
    const fd = this.fd
    if (fd !== undefined && !this.failure) apply(fd)
  }

  /**
   * Hands the connection's descriptor to a native thread (the demand path and the bulk reader, which dup() it):
   * this side reads nothing more on it, and a later fail() or close() only closes this side's descriptor. head: what
   * this side had read and not handled yet, as it came off the wire (the thread starts with it). undefined when the
   * transport has no descriptor, or the connection is sealed (handOverSealed()).
   */
  handOver(): { fd: number; head: Buffer } | undefined {
    if (this.opener) return undefined
    const t = this.takeOver()
    return t && { fd: t.fd, head: Buffer.concat([t.plain, t.unread]) }
  }

  /**
   * handOver() of a sealed connection's receiving direction (to a native thread that opens it): cipherHead, the
   * sealed bytes read and not opened (a record begun, what Node had not delivered), goes to the thread with `state`;
   * plainHead, the frames opened and not handled, before them. This side still writes (sealed) on the socket unless
   * `both` hands the sending direction over too (sendState).
   */
  handOverSealed(both = false): { fd: number; cipherHead: Buffer; plainHead: Buffer; state: SealState; sendState?: SealState } | undefined {
    const t = this.opener && this.takeOver()
    if (!t) return undefined
    const { state, partial } = this.opener!.handOff()
    // both: the sending direction too (the demand connection, written by its thread from now on)
    return { fd: t.fd, cipherHead: Buffer.concat([partial, t.unread]), plainHead: t.plain, state, ...(both ? { sendState: this.sealer!.handOff() } : {}) }
  }

  /** Stops reading here: the frames queued and a partial one (plain), and what Node had read and not delivered. */
  private takeOver(): { fd: number; plain: Buffer; unread: Buffer } | undefined {
    if (this.failure || this.fd === undefined) return undefined
    this.handedOver = true // the chunk takeSocket() reads emits 'data': it is in `unread`, not decoded
    const taken = takeSocket(this.socket)!
    // in the order they came off the wire: frames queued here, a partial frame, what Node had not delivered
    const plain: Buffer[] = this.queued.map((f) => Buffer.concat([frameHeader(f.type, f.payload.length), f.payload]))
    this.queued = []
    plain.push(this.decoder.drainRaw())
    return { fd: taken.fd, plain: Buffer.concat(plain), unread: taken.head }
  }

  private get fd(): number | undefined {
    return socketFd(this.socket)
  }

  get needsDrain(): boolean {
    return this.writer ? this.writer.needsDrain : this.socket.writableNeedDrain
  }

  /** Resolves when what was sent left (the socket drained; with a writer: all its queue), or the connection failed. */
  drain(): Promise<void> {
    if (this.failure) return Promise.resolve()
    if (this.writer) return this.waitWritten(this.writer.drained())
    if (!this.socket.writableNeedDrain) return Promise.resolve()
    return this.waitWritten(new Promise((resolve) => {
      const done = () => {
        this.socket.off('drain', done)
        this.socket.off('close', done)
        resolve()
      }
      this.socket.on('drain', done)
      this.socket.on('close', done)
    }))
  }

  /** written, unless the peer stops reading for stallTimeoutMs (then the connection fails) or it fails anyway. */
  private waitWritten(written: Promise<void>): Promise<void> {
    return new Promise((resolve) => {
      // (a deadline: after this process was stopped, the drain that came meanwhile is seen before it judges)
      const stalled = this.stallTimeoutMs > 0
        ? deadline(realTimers, this.stallTimeoutMs, () => {
          this.fail(migrationError(ErrorCode.CONNECTION, `${this.name} connection stalled: the peer has not read for ${this.stallTimeoutMs} ms (stopped or wedged); treated as a broken link`))
        })
        : undefined
      const done = () => {
        stalled?.()
        this.closeListeners = this.closeListeners.filter((l) => l !== done)
        resolve()
      }
      written.then(done, done)
      this.closeListeners.push(done)
    })
  }

  sendError(err: Error): void {
    const code = (err as UffdMigrateError).code ?? ErrorCode.PROTOCOL
    const retryAfterMs = (err as UffdMigrateError).retryAfterMs
    const body = { code, message: err.message, ...(retryAfterMs !== undefined ? { retryAfterMs } : {}), ...this.errorFields?.() }
    if (this.failure || this.socket.destroyed || this.errorSent || (err as UffdMigrateError).fromPeer) return
    this.errorSent = true // one reason per connection: the first (a later one only says that it ended)
    this.send(Buffer.concat(encodeControl(Msg.ERROR, body)))
  }

  private errorSent = false

  get failed(): Error | undefined {
    return this.failure
  }

  fail(err: Error): void {
    if (this.failure) return
    this.failure = err
    this.decoder.clear()
    for (const w of this.waiters) w.reject(err)
    this.waiters = []
    for (const l of this.closeListeners) l(err)
    this.closeListeners = []
    // the writer stops at once: the peer learns why from the urgent connection (the bulk one may be mid-frame)
    this.writer?.close()
    // nothing more is read (the kernel holds what the peer keeps sending, then the peer waits); our last words go out
    this.socket.pause()
    this.socket.end()
    setTimeout(() => this.socket.destroy(), 1000).unref()
  }

  close(): void {
    this.fail(migrationError(ErrorCode.ABORTED, `${this.name} connection closed`))
  }

  /** Drops the connection now (a hostile or idle peer: no time to flush, the descriptor goes at once). */
  destroy(): void {
    this.socket.destroy()
  }
}
