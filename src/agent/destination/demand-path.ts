/**
 * The destination's native demand path: a thread of the addon reads the
 * uffd's faults, asks the source on the demand connection and installs the
 * replies (native/demand_client.cc), so that a fault never waits for this event
 * loop, which is busy installing the push. Here its event batches become the
 * destination's bookkeeping (received count, ready() waits, latency, stats),
 * and a broken connection becomes the destination's one broken-link rule.
 */
import type { NativeBinding, NativeDemandClient, NativeUffd } from '../../binding'
import { ErrorCode, migrationError } from '../../errors'
import type { Channel } from '../../protocol/channel'
import type { Region } from '../../region'
import { DemandEv, installFailedError, nativeLinkError, eachDemandEvent } from '../demand-events'
import { NativeThread } from '../native-thread'
import { takeDuplex } from '../native-seal'
import type { NativeLinkSeal } from '../../binding'
import type { Placement } from './placement'
import type { Requests } from './requests'
import { type Clock, systemClock } from '../clock'
import { deadline } from '../../deadline'

/**
 * A clean end of the demand connection is the source hanging up; why (an ERROR such as a cancel) comes on urgent or
 * bulk, which another thread reads and which may be read later under load. It counts as a broken link only if
 * nothing else ended the session or replaced the connection within this long.
 */
export const DEMAND_HANGUP_GRACE_MS = 300

export class DemandPath {
  private client: NativeThread<NativeDemandClient> | undefined
  /** The session's demand connection arrived before REGIONS: its descriptor (and, sealed, its states), for start(). */
  private fd: number | undefined
  private seal: NativeLinkSeal | undefined
  /** CPU time of the native thread, once it has ended. */
  cpuMs = 0

  /** Counts demand connections (adopted or closed): a late hang-up must not break the next one. */
  private generation = 0
  /** The connection the thread uses now, as attach() numbered it (its CLOSED event carries it). */
  private linkId = 0

  constructor(
    private readonly binding: NativeBinding,
    private readonly regions: Region[],
    private readonly broken: (err: Error) => void,
    private readonly clock: Clock = systemClock,
  ) {}

  get active(): boolean {
    return this.client !== undefined
  }

  /** A demand connection passed the handshake (first, or back after a break). */
  adopt(ch: Channel): void {
    // the source sends nothing on it before this side asks: bytes already here are a protocol error
    const taken = this.binding.DemandClient ? takeDuplex(ch) : undefined
    const fd = taken && taken.head.length === 0 ? taken.fd : undefined
    if (fd === undefined) {
      const err = migrationError(ErrorCode.PROTOCOL, 'this destination cannot take a demand connection here (no native demand path, or bytes arrived before any request)')
      ch.sendError(err)
      return ch.fail(err)
    }
    this.generation++
    if (this.client) this.linkId = this.client.thread.attach(fd, taken!.seal)
    else this.fd = fd, this.seal = taken!.seal
  }

  /**
   * REGIONS: with a demand connection, the thread takes the uffd's faults from now on (true). detached: a new agent
   * that took over (takeover.ts) starts it before any connection; faults wait in it until the source is back.
   */
  start(uffd: NativeUffd, placement: Placement, requests: Requests, detached = false): boolean {
    if (this.fd === undefined && !(detached && this.binding.DemandClient)) return false
    this.cpuMs = 0
    const onEvents = (ev: Float64Array) => {
      // The figures first: an ARRIVED of this batch may settle the migration, and its report must count the whole
      // batch (the thread emits a fault's LATENCY after the ARRIVED of the reply that answered it).
      eachDemandEvent(ev, (kind, a, b, c) => {
        if (kind === DemandEv.NET_FAULT) {
          requests.stats.networkFaults++
          if (c > 1) requests.stats.readAheadPages += c - 1
        }
        else if (kind === DemandEv.ZERO_FAULT) requests.stats.localZeroFaults++
        else if (kind === DemandEv.LATENCY) requests.addNativeLatency(a, b === 1)
        else if (kind === DemandEv.CPU) this.cpuMs += a
      })
      eachDemandEvent(ev, (kind, a, b, c, d) => {
        if (kind === DemandEv.ARRIVED) placement.arrivedNatively(a, b, c, d)
        // (the end of a connection the thread had left for the next one: that link broke already)
        else if (kind === DemandEv.CLOSED && this.client && c === this.linkId) this.hungUp(nativeLinkError(a, b), a === 0 && b === 0)
        else if (kind === DemandEv.INSTALL_FAILED && this.client) this.broken(installFailedError(a, b, c, d))
      })
    }
    this.client = new NativeThread(new this.binding.DemandClient!(uffd.fd, this.regions.map((r) => r.id), placement.received.map((m) => m.words), onEvents), onEvents)
    if (this.fd !== undefined) this.linkId = this.client.thread.attach(this.fd, this.seal)
    this.fd = undefined
    this.seal = undefined
    return true
  }

  /** Page requests of ready() waits ([first, count] runs) go on the demand connection too: the thread installs the replies without waiting for this loop. */
  ask(region: number, runs: number[]): void {
    const pages: number[] = []
    for (let k = 0; k < runs.length; k += 2) for (let p = runs[k]; p < runs[k] + runs[k + 1]; p++) pages.push(p)
    this.client!.thread.ask(region, Uint32Array.from(pages))
  }

  /** The demand connection ended: a reset or a protocol breach breaks the link now, a clean hang-up after a grace. */
  private hungUp(err: Error, clean: boolean): void {
    if (!clean) return this.broken(err)
    const gen = this.generation, client = this.client
    deadline(this.clock, DEMAND_HANGUP_GRACE_MS, () => gen === this.generation && client === this.client && this.broken(err)) // (late: what arrived is read first)
  }

  /** The link broke: faults are recorded and asked for again on the next demand connection. */
  detach(): void {
    this.generation++
    if (this.client) this.linkId = this.client.thread.attach(-1)
  }

  /** When the oldest fault open on the native path was raised (undefined: none), on `nowMs`'s clock. */
  oldestOpenMs(nowMs: number): number | undefined {
    const us = this.client?.thread.oldestOpenUs ?? 0
    return us > 0 ? nowMs - us / 1000 : undefined
  }

  /** Stops the thread (before the uffd closes); what it did since its last batch is counted now (the settled report follows). */
  close(): void {
    const client = this.client
    this.generation++
    this.client = undefined
    this.fd = undefined
    this.seal = undefined
    client?.close()
  }
}
