/**
 * The destination's native bulk receive: a thread of the addon reads the
 * bulk connection and places PAGES and RANGES itself (native/bulk.cc, with
 * the rules of placement.ts), so that no page passes through this event loop
 * and none is copied in user space. Every other frame comes back here, in
 * order, for the message table; after HANDOFF the thread waits until the
 * discard list is applied (resume()). Without it (no addon support, or
 * UFFD_MIGRATE_BULK=js) the Channel's frames go through placement.ts.
 */
import type { NativeBinding, NativeBulkReader, NativeUffd } from '../../binding'
import type { Channel } from '../../protocol/channel'
import type { Frame } from '../../protocol/frames'
import type { Region } from '../../region'
import { DemandEv, nativeLinkError, eachDemandEvent, nativeBulkAvailable } from '../demand-events'
import { NativeThread } from '../native-thread'
import type { Placement } from './placement'

export interface BulkPathHooks {
  /** A frame the thread does not place (control messages), in order. */
  frame(f: Frame): void
  /** The connection ended or broke the protocol. */
  closed(err: Error): void
}

export class BulkPath {
  private reader: NativeThread<NativeBulkReader> | undefined
  /** The connection the thread reads (this side still writes on it). */
  private ch: Channel | undefined

  constructor(
    private readonly binding: NativeBinding,
    private readonly regions: Region[],
    private readonly hooks: BulkPathHooks,
  ) {}

  get active(): boolean {
    return this.reader !== undefined
  }

  /** CPU time of the thread so far, ms. */
  get cpuMs(): number {
    return this.reader?.thread.cpuMs ?? 0
  }

  /** REGIONS: the thread takes the bulk connection over (true), or the JS path stays. */
  start(uffd: NativeUffd, placement: Placement, ch: Channel): boolean {
    if (!nativeBulkAvailable(this.binding)) return false
    const taken = ch.handOver()
    if (!taken) return false
    this.ch = ch
    const words = (maps: { words: Uint32Array }[]) => maps.map((m) => m.words)
    // frames: the batch's frames (FRAME events); none come with the events close() hands back
    const onEvents = (ev: Float64Array, frames: Buffer[] = []) => eachDemandEvent(ev, (kind, a, b, c, d) => {
      if (kind === DemandEv.ARRIVED) placement.arrivedNatively(a, b, c, d)
      else if (kind === DemandEv.RECEIVED) placement.receivedNatively(a)
      else if (kind === DemandEv.TWICE) placement.pagesReceivedTwice += a
      else if (kind === DemandEv.FRAME && frames[a]) this.hooks.frame({ type: b, payload: frames[a] })
      else if (kind === DemandEv.CLOSED && this.reader) this.broke(nativeLinkError(a, b, 'bulk'))
    })
    const reader = new this.binding.BulkReader!(
      uffd.fd, this.regions.map((r) => r.id), words(placement.received), words(placement.knownZero), words(placement.freedHere),
      taken.fd, taken.head, onEvents,
    )
    this.reader = new NativeThread(reader, (ev) => onEvents(ev))
    this.adoptCounts(ch)
    return true
  }

  /** The discard list is applied: the thread places the post-copy push from now on. */
  resume(): void {
    this.reader?.thread.resume(true)
  }

  /** A bulk connection that came back after a break (its RECOVER handled): the thread reads it from here. */
  attach(ch: Channel): void {
    if (!this.reader) return
    const taken = ch.handOver()
    if (taken) this.reader.thread.attach(taken.fd, taken.head)
    this.adoptCounts(ch)
  }

  /** The stuck-source watchdog sees the bytes the thread reads from now on as this connection's. */
  private adoptCounts(ch: Channel): void {
    this.ch = ch
    const reader = this.reader!.thread, base = reader.bytesRead
    ch.readBy(() => reader.bytesRead - base)
  }

  private broke(err: Error): void {
    // a frame whose length header is out of bounds: the peer hears why, as on the JS path
    if ((err as { code?: string }).code === 'ERR_MIGRATION_PROTOCOL') this.ch?.sendError(err)
    this.hooks.closed(err)
  }

  /** The link broke. */
  detach(): void {
    this.reader?.thread.attach(-1)
  }

  close(): void {
    const reader = this.reader
    this.reader = undefined
    reader?.close()
  }
}
