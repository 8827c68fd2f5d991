/**
 * The destination's native bulk receive: a thread of the addon reads the
 * bulk connection and places PAGES and RANGES itself (native/bulk.cc, with
 * the rules of placement.ts), so that no page passes through this event loop
 * and none is copied in user space. Every other frame comes back here, in
 * order, for the message table; after HANDOFF the thread waits until the
 * discard list is applied (resume()). Without it (no addon support, or
 * UFFD_MIGRATE_BULK=js) the Channel's frames go through placement.ts.
 * A sealed connection (an encrypted migration): the thread opens its records
 * itself (native/records.h), where JS stopped.
 *
 * Extra bulk streams (the source's `streams` option, pre-copy only) get a
 * thread each, placing whatever arrives on them: the source sends every
 * frame about a page on that page's stream, so per-stream order is per-page
 * order. Their only other frame is SYNC (answered on the same stream: the
 * source's barrier before HANDOFF); at the hand-off they are closed, so that
 * nothing can reach the running service's memory with pre-copy's rules.
 */
import type { NativeBinding, NativeBulkReader, NativeUffd } from '../../binding'
import { ErrorCode, migrationError } from '../../errors'
import type { Channel } from '../../protocol/channel'
import type { Frame } from '../../protocol/frames'
import { encodeControl, Msg } from '../../protocol/messages'
import type { Region } from '../../region'
import { DemandEv, installFailedError, nativeLinkError, eachDemandEvent, nativeBulkAvailable } from '../demand-events'
import { NativeThread } from '../native-thread'
import { nativeSealAvailable, takeForThread } from '../native-seal'
import type { Placement } from './placement'

export interface BulkPathHooks {
  /** A frame the thread does not place (control messages), in order. */
  frame(f: Frame): void
  /** The connection ended, broke the protocol (the session decides whether the peer hears why), or its pages could not be placed. */
  closed(err: Error): void
}

/** Extra bulk streams one session may open beside bulk. */
export const MAX_EXTRA_STREAMS = 7

export class BulkPath {
  private reader: NativeThread<NativeBulkReader> | undefined
  /** The connection the thread reads (this side still writes on it). */
  private ch: Channel | undefined
  /** Extra streams' readers (before the hand-off only). */
  private streams: BulkPath[] = []
  private started: { uffd: NativeUffd; placement: Placement } | undefined
  /** CPU time of extra streams' threads that ended. */
  private streamsCpuMs = 0

  constructor(
    private readonly binding: NativeBinding,
    private readonly regions: Region[],
    private readonly hooks: BulkPathHooks,
  ) {}

  get active(): boolean {
    return this.reader !== undefined
  }

  /** start() would run the native reader on ch (built in, nobody asked for the JS path; sealed: it opens the records itself). */
  readerWouldRun(ch: Channel): boolean {
    return nativeBulkAvailable(this.binding) && (!ch.sealed || nativeSealAvailable(this.binding))
  }

  /** CPU time of the thread (and of the extra streams' threads) so far, ms. */
  get cpuMs(): number {
    return (this.reader?.thread.cpuMs ?? 0) + this.streamsCpuMs + this.streams.reduce((n, s) => n + s.cpuMs, 0)
  }

  /** How many extra streams this side takes (REGIONS asked for `wanted`): none without the native reader (a preflight asks before it starts). */
  streamsFor(wanted: unknown, withReader = this.active): number {
    if (!withReader || typeof wanted !== 'number' || !Number.isInteger(wanted) || wanted < 2) return 0
    return Math.min(wanted - 1, MAX_EXTRA_STREAMS)
  }

  /** An extra stream of the session (admitted by the acceptor): a thread of its own places its pages. */
  addStream(ch: Channel, failed: (err: Error) => void): void {
    if (!this.started) return failed(migrationError(ErrorCode.PROTOCOL, 'an extra bulk stream before the region table'))
    const stream: BulkPath = new BulkPath(this.binding, this.regions, {
      frame: (f) => {
        if (f.type === Msg.SYNC) return void ch.send(encodeControl(Msg.SYNC, {}))
        failed(migrationError(ErrorCode.PROTOCOL, `unexpected message ${f.type} on an extra bulk stream (only pages, ranges and SYNC)`))
      },
      closed: (err) => this.streams.includes(stream) && failed(err),
    })
    this.streams.push(stream)
    if (!stream.start(this.started.uffd, this.started.placement, ch)) failed(migrationError(ErrorCode.PROTOCOL, 'extra bulk streams need the native bulk reader'))
  }

  /** The hand-off: the extra streams are quiet (the source's barrier) and closed from now on. */
  endStreams(): void {
    const streams = this.streams
    this.streams = []
    for (const s of streams) {
      s.close()
      this.streamsCpuMs += s.endedCpuMs
      s.ch?.close()
    }
  }

  /** REGIONS: the thread takes the bulk connection over (true), or the JS path stays. */
  start(uffd: NativeUffd, placement: Placement, ch: Channel): boolean {
    if (!this.readerWouldRun(ch)) return false
    const taken = takeForThread(ch)
    if (!taken) return false
    this.ch = ch
    const words = (maps: { words: Uint32Array }[]) => maps.map((m) => m.words)
    // frames: the batch's frames (FRAME events); none come with the events close() hands back
    const onEvents = (ev: Float64Array, frames: Buffer[] = []) => {
      // TWICE first: the thread emits it after its frame's ARRIVED, which may settle the migration, and the settled
      // report must count it; the rest in order (frames and placements)
      eachDemandEvent(ev, (kind, a) => void (kind === DemandEv.TWICE && (placement.pagesReceivedTwice += a)))
      eachDemandEvent(ev, (kind, a, b, c, d) => {
        if (kind === DemandEv.ARRIVED) placement.arrivedNatively(a, b, c, d)
        else if (kind === DemandEv.RECEIVED) placement.receivedNatively(a)
        else if (kind === DemandEv.FRAME && frames[a]) this.hooks.frame({ type: b, payload: frames[a] })
        // (a connection's end that reached this loop after the thread had moved on to the next one is that link's,
        // which broke already: a late one broke the link that replaced it, and the source had to dial again)
        else if (kind === DemandEv.CLOSED && this.reader && c === this.linkId) this.hooks.closed(nativeLinkError(a, b, 'bulk'))
        else if (kind === DemandEv.INSTALL_FAILED && this.reader) this.hooks.closed(installFailedError(a, b, c, d))
      })
    }
    const reader = new this.binding.BulkReader!(
      uffd.fd, this.regions.map((r) => r.id), words(placement.received), words(placement.knownZero), words(placement.freedHere),
      taken.fd, taken.head, onEvents, placement.lazyZero, taken.seal,
    )
    this.reader = new NativeThread(reader, (ev) => onEvents(ev))
    this.linkId = 0
    this.started = { uffd, placement }
    this.streamsCpuMs = 0 // a new session's
    this.adoptCounts(ch)
    return true
  }

  /** The discard list is applied: the thread places the post-copy push from now on. */
  resume(): void {
    this.placing = true
    this.reader?.thread.resume(true)
  }

  /** The service runs: the thread places the push (resume()), on every link from now on. */
  private placing = false

  /**
   * A bulk connection that came back after a break (its RECOVER handled): the thread reads it from here. An agent that
   * took over from a crashed one has no thread yet: its first connection starts one, placing the push at once.
   */
  attach(ch: Channel, uffd: NativeUffd, placement: Placement): void {
    if (!this.reader) return void (this.start(uffd, placement, ch) && this.resume())
    const taken = takeForThread(ch)
    if (taken) this.linkId = this.reader.thread.attach(taken.fd, taken.head, taken.seal)
    // (the thread stops at a frame it hands back, until JS said; one JS refused broke the link, and the next is read)
    if (taken && this.placing) this.reader.thread.resume(true)
    this.adoptCounts(ch)
  }

  /** The stuck-source watchdog sees the bytes the thread reads from now on as this connection's. */
  private adoptCounts(ch: Channel): void {
    this.ch = ch
    const reader = this.reader!.thread, base = reader.bytesRead
    ch.readBy(() => reader.bytesRead - base)
  }

  /** The link broke. */
  detach(): void {
    if (this.reader) this.linkId = this.reader.thread.attach(-1)
  }

  /** The connection the thread reads now, as attach() numbered it (its CLOSED event carries it). */
  private linkId = 0

  /** CPU time of the thread when it was closed, ms. */
  private endedCpuMs = 0

  close(): void {
    this.endStreams()
    const reader = this.reader
    this.reader = undefined
    if (reader) this.endedCpuMs = reader.thread.cpuMs
    reader?.close()
    this.started = undefined
    this.placing = false
  }
}
