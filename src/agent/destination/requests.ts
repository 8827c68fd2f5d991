/**
 * What the destination asks for after the hand-off: page faults of the
 * service's threads (PAGE_REQUEST, kind FAULT), ready() waits (PAGE_REQUEST,
 * kind READY), willNeed() hints (WILL_NEED) and free() (zero-filled here,
 * FREED to the source). One request per page: the in-flight map remembers
 * what was asked for until it arrives.
 */
import type { NativeUffd } from '../../binding'
import { PageBitmap } from '../../bitmap'
import { Msg, RequestKind } from '../../protocol/messages'
import type { Region } from '../../region'
import { type LatencySummary, Samples } from '../../stats'
import type { Clock } from '../clock'
import type { Placement } from './placement'

export interface RequestSink {
  /** Sends a run list on the urgent channel (false: no link now; it is asked again on recovery). */
  request(type: Msg.PAGE_REQUEST | Msg.WILL_NEED, region: number, runs: number[], kind: RequestKind): void
  /** Sends FREED on the bulk channel. */
  freed(region: number, runs: number[]): void
  /** These ready() waits are satisfied. */
  ready(ids: number[]): void
}

export class Requests {
  /** Asked for and not arrived yet. */
  readonly inFlight: PageBitmap[]
  /** Open faults: region * 2^32 + page -> when the agent saw it (for the latency figures). */
  private readonly faultStart = new Map<number, number>()
  /**
   * Page requests for ready() waits, oldest first: when, and what (the stuck-source watchdog). Arrivals do
   * not touch it (the push's hot path); oldestRequestSinceMs() drops the answered ones from the front.
   */
  private readyAsked: { atMs: number; region: number; runs: number[] }[] = []
  /** Native region id -> index in `regions` (fault events carry the id). */
  private readonly regionIndex: Map<number, number>
  /** ready() waits of the service: id -> range; answered when the range is local. */
  private readonly waits = new Map<number, { region: number; first: number; count: number }>()
  /**
   * Open waits by the first page of their range still missing (key: region * 2^32 + page): an arrival looks up
   * the pages it placed, not every open wait (right after a hand-off the service opens ~100 per tick).
   */
  private readonly waitsAt = new Map<number, number[]>()
  /** The last askAgain(): open requests count as asked from then on. */
  private askedAgainAtMs = -Infinity
  /** Faults timed here, in JS (the JS demand path). */
  private readonly latency = new Samples()
  /** Faults the native demand thread timed, by what answered them: its own reply, or the push (the page was on its way). */
  private readonly latencyByPath = { reply: new Samples(), push: new Samples() }
  readonly stats = { networkFaults: 0, localZeroFaults: 0, networkFaultsOnZeroPages: 0, readAheadPages: 0 }
  private uffd: NativeUffd | undefined

  constructor(
    private readonly regions: Region[],
    private readonly placement: Placement,
    private readonly ps: number,
    private readonly clock: Clock,
    private readonly sink: RequestSink,
  ) {
    this.regionIndex = new Map(regions.map((r, i) => [r.id, i]))
    this.inFlight = regions.map((r) => new PageBitmap(r.pageCount))
  }

  attach(uffd: NativeUffd | undefined): void {
    this.uffd = uffd
  }

  /** A fault the native demand thread timed: push = installed by the push rather than by its reply. */
  addNativeLatency(us: number, push: boolean): void {
    ;(push ? this.latencyByPath.push : this.latencyByPath.reply).add(us)
  }

  /** The settled report's fault figures (by path where the native demand thread timed them). */
  latencyReport(): { faultLatencyUs: LatencySummary; faultLatencyByPathUs?: { reply: LatencySummary; push: LatencySummary } } {
    const { reply, push } = this.latencyByPath
    return {
      faultLatencyUs: Samples.merged(this.latency, reply, push).summary(),
      ...(reply.length + push.length ? { faultLatencyByPathUs: { reply: reply.summary(), push: push.summary() } } : {}),
    }
  }

  /** Runs of [first, first+count) not received yet: [first, count, ...]. */
  missingRuns(region: number, first: number, count: number): number[] {
    const runs: number[] = []
    const map = this.placement.received[region], end = first + count
    for (let p = map.nextClear(first, end); p !== -1; p = map.nextClear(p + 1, end)) {
      let q = map.nextSet(p, end)
      if (q === -1) q = end
      runs.push(p, q - p)
      p = q
    }
    return runs
  }

  /** Fault events from the uffd reader: triples [regionId, page, flags]. */
  onFaults(ev: Uint32Array): void {
    const now = this.clock.now()
    const requests = new Map<number, number[]>()
    for (let i = 0; i < ev.length; i += 3) {
      const region = this.regionIndex.get(ev[i])
      if (region !== undefined) this.resolveFault(region, ev[i + 1], now, requests)
    }
    for (const [region, pages] of requests) this.sink.request(Msg.PAGE_REQUEST, region, pages, RequestKind.FAULT)
  }

  private resolveFault(region: number, page: number, now: number, requests: Map<number, number[]>): void {
    const r = this.regions[region]
    if (this.placement.received[region].has(page)) {
      // Known zero (never populated, all-zero or freed): place it here.
      // A page placed since the fault was raised answers EEXIST: just wake.
      if (this.uffd!.zeropage(r.id, page * this.ps, this.ps) > 0) this.uffd!.wake(r.id, page * this.ps, this.ps)
      else this.stats.localZeroFaults++
      return
    }
    if (this.inFlight[region].has(page)) return // already asked for: one request per page
    this.inFlight[region].set(page)
    this.stats.networkFaults++
    if (this.placement.knownZero[region].has(page)) this.stats.networkFaultsOnZeroPages++
    this.faultStart.set(pageKey(region, page), now)
    const list = requests.get(region) ?? []
    list.push(page, 1)
    requests.set(region, list)
  }

  /**
   * ready() from the service: answered once the range is local, asked for
   * with urgent priority now (askNow) or when the link is back (askAgain).
   */
  waitFor(id: number, region: number, first: number, count: number, askNow: boolean): void {
    if (this.placement.received[region].allSet(first, count)) return this.sink.ready([id])
    this.waits.set(id, { region, first, count })
    this.park(id, region, first, count)
    if (askNow) this.request(region, first, count, true)
  }

  /** ready() (urgent) or willNeed() (a hint): ask for the missing pages of a range now. */
  request(region: number, first: number, count: number, urgent: boolean): void {
    const missing = this.missingRuns(region, first, count)
    if (!urgent) {
      if (missing.length) this.sink.request(Msg.WILL_NEED, region, missing, RequestKind.READY)
      return
    }
    // only the pages nobody asked for yet
    const runs: number[] = []
    const inFlight = this.inFlight[region]
    for (let k = 0; k < missing.length; k += 2) {
      for (let q = missing[k]; q < missing[k] + missing[k + 1]; q++) {
        if (inFlight.has(q)) continue
        inFlight.set(q)
        runs.push(q, 1)
      }
    }
    if (!runs.length) return
    this.readyAsked.push({ atMs: this.clock.now(), region, runs })
    this.sink.request(Msg.PAGE_REQUEST, region, runs, RequestKind.READY)
  }

  /**
   * The service freed a range during post-copy: pages not here yet are
   * zero-filled locally (unless the service's thread `filled` them already) and the source is told not to push them.
   */
  free(region: number, first: number, count: number, filled = false): void {
    const runs = this.missingRuns(region, first, count)
    for (let k = 0; k < runs.length; k += 2) this.placement.freeLocally(region, runs[k], runs[k + 1], filled)
    if (runs.length) this.sink.freed(region, runs)
  }

  /** Pages placed (post-copy): time the faults they answer, wake ready() waits. */
  arrived(region: number, first: number, count: number): void {
    const lo = pageKey(region, first), hi = lo + count
    if (this.faultStart.size) {
      // a few faults are open at a time: look them up, not every page of the run
      const now = this.clock.now()
      for (const [key, t] of this.faultStart) {
        if (key < lo || key >= hi) continue
        this.latency.add((now - t) * 1000)
        this.faultStart.delete(key)
      }
    }
    this.inFlight[region].clearRange(first, count)
    if (this.waits.size) this.wakeWaits(region, first, count)
  }

  /** Files a wait under the first page of its range still missing; false when none is (the wait is answered). */
  private park(id: number, region: number, first: number, count: number): boolean {
    const page = this.placement.received[region].nextClear(first, first + count)
    if (page === -1) return false
    const key = pageKey(region, page), ids = this.waitsAt.get(key)
    if (ids) ids.push(id)
    else this.waitsAt.set(key, [id])
    return true
  }

  /** O(min(pages placed, open waits)): only the waits filed under one of these pages are looked at, and filed again further on when still short. */
  private wakeWaits(region: number, first: number, count: number): void {
    const done: number[] = []
    const lo = pageKey(region, first), hi = lo + count
    const wake = (key: number, ids: number[]) => {
      this.waitsAt.delete(key)
      for (const id of ids) {
        const w = this.waits.get(id)
        if (w && !this.park(id, w.region, w.first, w.count)) done.push(id)
      }
    }
    // a long run with few waits open looks at the waits, a short one at its pages (a Map may be changed while iterated)
    if (this.waitsAt.size < count) {
      for (const [key, ids] of this.waitsAt) if (key >= lo && key < hi) wake(key, ids)
    } else {
      for (let key = lo; key < hi; key++) {
        const ids = this.waitsAt.get(key)
        if (ids) wake(key, ids)
      }
    }
    for (const id of done) this.waits.delete(id)
    if (done.length) this.sink.ready(done)
  }

  /** Since when the oldest open page request (a fault's or a ready() wait's) has waited for its page (undefined: none open). */
  oldestRequestSinceMs(): number | undefined {
    const answered = (a: { region: number; runs: number[] }) => {
      for (let k = 0; k < a.runs.length; k += 2) if (!this.placement.received[a.region].allSet(a.runs[k], a.runs[k + 1])) return false
      return true
    }
    while (this.readyAsked.length && answered(this.readyAsked[0])) this.readyAsked.shift()
    let oldest = this.readyAsked.length ? this.readyAsked[0].atMs : Infinity
    for (const t of this.faultStart.values()) if (t < oldest) oldest = t
    return oldest === Infinity ? undefined : Math.max(oldest, this.askedAgainAtMs)
  }

  /** Recovery: ask again for every page in flight and every open ready() range (their replies may be lost). */
  askAgain(): void {
    this.askedAgainAtMs = this.clock.now()
    for (let region = 0; region < this.regions.length; region++) {
      const runs: number[] = []
      for (const [first, count] of this.inFlight[region].runs()) runs.push(first, count)
      if (runs.length) this.sink.request(Msg.PAGE_REQUEST, region, runs, RequestKind.FAULT)
    }
    for (const w of this.waits.values()) this.request(w.region, w.first, w.count, true)
  }

  /** Settled: every wait is answered. */
  releaseAll(): void {
    if (this.waits.size) this.sink.ready([...this.waits.keys()])
    this.waits.clear()
    this.waitsAt.clear()
  }
}

/** The destination's SETTLED report: its fault figures, what was placed, and its CPU time (ms, where measured). */
export function settledReport(requests: Requests, placement: Placement, nativeBulk: boolean, cpuMs: number | undefined, protocolBreaks: number): Record<string, unknown> {
  return {
    ...requests.stats, bulkReceive: nativeBulk ? 'native' : 'js', protocolBreaks,
    ...(cpuMs !== undefined ? { cpuMs } : {}),
    pagesReceivedTwice: placement.pagesReceivedTwice,
    pagesLocal: placement.totalPages,
    ...requests.latencyReport(),
  }
}

/** One number per page of any region: the key of the maps by page (region < 2^21 keeps it exact). */
function pageKey(region: number, page: number): number {
  return region * 2 ** 32 + page
}
