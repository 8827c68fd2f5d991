/** What a Channel (channel.ts) is built on and writes through. */

/** The part of net.Socket a Channel uses. */
export interface Transport {
  write(chunk: Buffer): boolean
  cork(): void
  uncork(): void
  end(): void
  destroy(): void
  pause(): void
  resume(): void
  isPaused(): boolean
  setNoDelay?(noDelay: boolean): void
  readonly destroyed: boolean
  readonly writableNeedDrain: boolean
  on(event: 'data', fn: (chunk: Buffer) => void): unknown
  on(event: 'error', fn: (err: Error) => void): unknown
  on(event: 'close' | 'drain', fn: () => void): unknown
  off(event: 'close' | 'drain', fn: () => void): unknown
}

/**
 * Something that writes this connection's frames instead of the socket (the
 * source's native bulk writer): frames keep the order they were given in.
 */
export interface FrameWriter {
  /** Queues a whole frame. */
  write(frame: Buffer): void
  /** Bytes it wrote so far. */
  readonly bytesWritten: number
  /** It holds enough queued work that the caller should wait for drained(). */
  readonly needsDrain: boolean
  /** Resolves when everything queued so far is written (or the writer failed). */
  drained(): Promise<void>
  /** Stops at once; what is queued is dropped (the connection is failing). */
  close(): void
}
