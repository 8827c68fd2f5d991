/**
 * The source's bulk connection written by a native thread
 * (native/bulk_writer.cc): the agent keeps choosing what goes (rounds, hot
 * pages, the push policy) and hands over runs of pages in batches; the
 * thread splits, zero-checks and writes them from region memory. Every
 * frame the agent sends on the connection goes through the same queue, so
 * the wire order is the order of the calls. UFFD_MIGRATE_BULK=js keeps the
 * writes in JavaScript (for comparison, and the pure tier's path).
 */
import type { NativeBinding, NativeBulkWriter } from '../../binding'
import type { FrameWriter } from '../../protocol/channel'
import { DemandEv, eachDemandEvent } from '../demand-events'
import { NativeThread } from '../native-thread'
import type { SealState } from '../../protocol/records'

/** Queued bytes above which senders wait (the kernel's socket buffer holds 4 MiB more before the hand-off). */
const HIGH_WATER_BYTES = 16 << 20

export interface BatchResult {
  data: number
  zero: number
}

export interface WriterHooks {
  /** A batch went: its data pages, zero pages, and pages that had been sent before. */
  onDone(data: number, zero: number, resent: number): void
  /** Pages taken from the pending map and sent (after the hand-off). */
  onSent(region: number, first: number, count: number): void
  /** A write failed (errno); nothing more is written. */
  onClosed(errno: number): void
  /** The thread ended: its CPU time. */
  onCpu(ms: number): void
}

/** The native writer is built in, and nobody asked for the JS path (UFFD_MIGRATE_BULK=js). */
export function nativeWriterAvailable(binding: NativeBinding): boolean {
  return binding.BulkWriter !== undefined && process.env.UFFD_MIGRATE_BULK !== 'js'
}

export class NativeBulkSend implements FrameWriter {
  private readonly thread: NativeThread<NativeBulkWriter>
  private readonly writer: NativeBulkWriter
  /** Sequence number of the last command the thread finished. */
  private doneSeq = 0
  private lastSeq = 0
  private batches = new Map<number, (r: BatchResult) => void>()
  private idleWaiters: { seq: number; resolve: () => void }[] = []
  private closed = false

  /** seal: the connection's sending direction (an encrypted migration): the thread seals what it writes. */
  constructor(binding: NativeBinding, fd: number, regionIds: number[], destHas: Uint32Array[], everSent: Uint32Array[], hooks: WriterHooks, seal?: SealState) {
    const onEvents = (ev: Float64Array) => eachDemandEvent(ev, (ev, a, b, c, d) => {
      const kind = ev as number
      if (kind === WriterEv.DONE) {
        hooks.onDone(b, c, d)
        this.batches.get(a)?.({ data: b, zero: c })
        this.batches.delete(a)
        this.finished(a)
      } else if (kind === WriterEv.SENT) hooks.onSent(a, b, c)
      else if (kind === WriterEv.IDLE) this.finished(a)
      else if (kind === (DemandEv.CLOSED as number)) hooks.onClosed(a)
      else if (kind === (DemandEv.CPU as number)) hooks.onCpu(a)
    })
    this.writer = new binding.BulkWriter!(fd, regionIds, destHas, everSent, onEvents, seal && { send: seal })
    this.thread = new NativeThread(this.writer, onEvents)
  }

  write(frame: Buffer): void {
    if (!this.closed) this.lastSeq = this.writer.frame(frame)
  }

  /** Queues runs ((first, count) pairs) of one region; resolves when they went (zero counts if the writer closed first). */
  pages(region: number, runs: Uint32Array, framePages?: number, takePending = false): Promise<BatchResult> {
    if (this.closed || runs.length === 0) return Promise.resolve({ data: 0, zero: 0 })
    const seq = (this.lastSeq = this.writer.pages(region, runs, framePages, takePending))
    return new Promise((resolve) => this.batches.set(seq, resolve))
  }

  setPending(pending: Uint32Array[]): void {
    if (!this.closed) this.writer.setPending(pending)
  }

  announceBatches(): void {
    if (!this.closed) this.writer.announceBatches(true)
  }

  get bytesWritten(): number {
    return this.closed ? this.finalBytes : this.writer.bytesWritten
  }

  get needsDrain(): boolean {
    return !this.closed && this.writer.queuedBytes > HIGH_WATER_BYTES
  }

  /** CPU time so far while it runs (the thread's own figure arrives through onCpu when it ends). */
  get cpuMs(): number {
    return this.closed ? 0 : this.writer.cpuMs
  }

  drained(): Promise<void> {
    if (this.closed || this.doneSeq >= this.lastSeq) return Promise.resolve()
    return new Promise((resolve) => this.idleWaiters.push({ seq: this.lastSeq, resolve }))
  }

  private finalBytes = 0

  close(): void {
    if (this.closed) return
    this.finalBytes = this.writer.bytesWritten
    this.thread.close() // events still queued are handled now (counts, CPU)
    this.closed = true
    for (const resolve of this.batches.values()) resolve({ data: 0, zero: 0 })
    this.batches.clear()
    this.finished(Infinity)
  }

  private finished(seq: number): void {
    if (seq > this.doneSeq) this.doneSeq = seq
    const ready = this.idleWaiters.filter((w) => w.seq <= this.doneSeq)
    if (!ready.length) return
    this.idleWaiters = this.idleWaiters.filter((w) => w.seq > this.doneSeq)
    for (const w of ready) w.resolve()
  }
}

/** The writer's own event kinds (native/bulk_writer.cc); CLOSED and CPU are the demand threads'. */
const enum WriterEv {
  DONE = 1,
  SENT = 2,
  IDLE = 3,
}
