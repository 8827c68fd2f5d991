/**
 * Two ends of an in-memory connection shaped like net.Socket (the part a
 * Channel uses), for the pure test tier: bytes written on one end arrive on
 * the other on a later turn of the loop, in order, in the chunks they were
 * written; pause() holds them back; a writer sees backpressure
 * (writableNeedDrain, 'drain') while more than highWaterBytes are unread.
 * cut() breaks the link like a reset: both ends get 'error' and 'close'.
 */
import { EventEmitter } from 'node:events'

export class MemoryTransport extends EventEmitter {
  peer!: MemoryTransport
  destroyed = false
  private paused = false
  private inbox: Buffer[] = []
  private corked = false
  private flushScheduled = false
  /** Bytes written by this end that the peer has not delivered yet. */
  unread = 0
  private needDrain = false

  constructor(private readonly highWaterBytes: number) {
    super()
  }

  static pair(highWaterBytes = 1 << 20): [MemoryTransport, MemoryTransport] {
    const a = new MemoryTransport(highWaterBytes), b = new MemoryTransport(highWaterBytes)
    a.peer = b
    b.peer = a
    return [a, b]
  }

  get writableNeedDrain(): boolean {
    return this.needDrain
  }

  write(chunk: Buffer): boolean {
    if (this.destroyed || this.peer.destroyed) return false
    // a copy: the writer may reuse or unmap its buffer (pages are views of a region)
    this.peer.inbox.push(Buffer.from(chunk))
    this.unread += chunk.length
    if (!this.corked) this.peer.scheduleFlush()
    if (this.unread > this.highWaterBytes) this.needDrain = true
    return !this.needDrain
  }

  cork(): void {
    this.corked = true
  }

  uncork(): void {
    this.corked = false
    this.peer.scheduleFlush()
  }

  setNoDelay(): void {}

  pause(): void {
    this.paused = true
  }

  resume(): void {
    this.paused = false
    this.scheduleFlush()
  }

  isPaused(): boolean {
    return this.paused
  }

  private scheduleFlush(): void {
    if (this.flushScheduled) return
    this.flushScheduled = true
    setImmediate(() => {
      this.flushScheduled = false
      this.flush()
    })
  }

  private flush(): void {
    while (!this.paused && !this.destroyed && this.inbox.length) {
      const chunk = this.inbox.shift()!
      this.peer.consumed(chunk.length)
      this.emit('data', chunk)
    }
    if (this.inbox.length === 0 && this.peerEnded && !this.destroyed) this.finish()
  }

  private consumed(n: number): void {
    this.unread -= n
    if (this.needDrain && !this.drainHeld && this.unread <= this.highWaterBytes / 2) {
      this.needDrain = false
      this.emit('drain')
    }
  }

  /**
   * Writes say "wait for drain" until the returned release is called, as a
   * socket whose buffer is full would (a slow drain, to order events in tests).
   */
  holdDrain(): () => void {
    this.needDrain = true
    this.drainHeld = true
    return () => {
      this.drainHeld = false
      this.consumed(0)
    }
  }

  private drainHeld = false
  private peerEnded = false

  /** Half-close: the peer sees 'close' after the bytes already written. */
  end(): void {
    if (this.destroyed) return
    this.peer.peerEnded = true
    this.peer.scheduleFlush()
    setImmediate(() => this.finish())
  }

  destroy(): void {
    this.finish()
    this.peer.peerEnded = true
    this.peer.scheduleFlush()
  }

  private finish(): void {
    if (this.destroyed) return
    this.destroyed = true
    this.inbox = []
    this.emit('close')
  }

  /** The link breaks (a reset): both ends fail now, whatever was in flight is lost. */
  cut(): void {
    for (const end of [this, this.peer]) {
      if (end.destroyed) continue
      end.inbox = []
      end.emit('error', Object.assign(new Error('read ECONNRESET'), { code: 'ECONNRESET' }))
      end.finish()
    }
  }
}
