/**
 * The destination side of one migration, in the agent's worker. Before the
 * hand-off, pages are written straight into the (not yet registered)
 * regions; at the hand-off the discard list is applied and the regions are
 * registered MISSING; after it, faults become page requests on the urgent
 * channel, pushed pages are placed with UFFDIO_COPY and known-zero pages with
 * UFFDIO_ZEROPAGE, locally. Settled = every page is local.
 */
import { createServer, type Server, type Socket } from 'node:net'
import type { NativeBinding, NativeUffd } from '../binding'
import { PageBitmap } from '../bitmap'
import { ErrorCode, migrationError, type UffdMigrateError } from '../errors'
import { Channel } from '../protocol/channel'
import type { Frame } from '../protocol/frames'
import { peerError, serverHandshake } from '../protocol/handshake'
import {
  BULK_SOCKET_BUFFER_BYTES, decodeControl, decodePages, decodeRuns, encodeControl, encodeRuns, field, Msg, RangeKind, type RegionLayout,
  RequestKind, uint,
} from '../protocol/messages'
import type { Region } from '../region'
import { nowMs, Samples } from '../stats'
import { parseAddress } from './address'

export interface DestinationHooks {
  /** The hand-off arrived: resume the service with this state. Resolves when it runs. */
  restore(state: Uint8Array): Promise<number>
  /** Every page is local. */
  settled(): void
  /** These ready() waits of the service are satisfied: their ranges are local. */
  ready(waitIds: number[]): void
  failed(err: Error): void
  /** The connection broke during post-copy; the source has recoveryTimeoutMs to come back. */
  recovering?(message: string): void
}

type Phase = 'setup' | 'precopy' | 'handoff' | 'postcopy' | 'recovering' | 'settled' | 'failed'

/** Longest stretch ready() requests may hold the push back (then it runs as long). */
const READY_PAUSE_MS = 5

export class MigrationDestination {
  private server: Server | undefined
  private urgent: Channel | undefined
  private bulk: Channel | undefined
  private session: string | undefined
  private layout: RegionLayout[] = []
  private readonly ps: number
  /** Shared with the service's thread: isLocal() reads it. */
  readonly received: PageBitmap[]
  private receivedCount = 0
  private readonly totalPages: number
  private inFlight: PageBitmap[] = []
  /** Pages announced as zero/free (placed locally, never requested). */
  private knownZero: PageBitmap[] = []
  /** Freed by the service during post-copy and zero-filled here. */
  private freedHere: PageBitmap[] = []
  private uffd: NativeUffd | undefined
  private phase: Phase = 'setup'
  /** Open faults: region * 2^32 + page -> when the agent saw it (for the latency figures). */
  private readonly faultStart = new Map<number, number>()
  /** Native region id -> index in `regions` (fault events carry the id). */
  private readonly regionIndex: Map<number, number>
  /** Open PAGE_REQUESTs by kind (READY, FAULT). */
  private openRequests = [0, 0]
  private readyPausedSince = 0
  private readyHoldoffUntil = 0
  private readyTimer: NodeJS.Timeout | undefined
  /** Bulk reading paused until the next turn of the loop (see throttleBulk). */
  private bulkYielding = false
  /** ready() waits of the service: id -> range; answered when the range is local. */
  private readonly waits = new Map<number, { region: number; first: number; count: number }>()
  private readonly latency = new Samples()
  private readonly stats = { networkFaults: 0, localZeroFaults: 0, networkFaultsOnZeroPages: 0, pagesReceivedTwice: 0 }
  /** Post-copy recovery: how long a broken link may stay broken (from HANDOFF; 0: no recovery). */
  private recoveryTimeoutMs = 0
  /** From REGIONS: a silent peer fails a connection after this long (0: never). */
  private linkTimeoutMs = 0
  private recoveryTimer: NodeJS.Timeout | undefined
  /** When the service resumed here (repeated in RECOVER_STATE: a RESUMED may be lost in a break). */
  private resumedAtMs: number | undefined
  /** The SETTLED report, kept for a source that lost it in a break. */
  private settledReport: Record<string, unknown> | undefined

  constructor(
    private readonly binding: NativeBinding,
    private readonly regions: Region[],
    received: PageBitmap[],
    private readonly token: Buffer,
    private readonly hooks: DestinationHooks,
  ) {
    this.ps = binding.pageSize
    this.regionIndex = new Map(regions.map((r, i) => [r.id, i]))
    this.received = received
    this.totalPages = regions.reduce((n, r) => n + r.pageCount, 0)
  }

  /** Starts listening; resolves with the bound port. */
  listen(addr: string): Promise<number> {
    const { host, port } = parseAddress(addr, '0.0.0.0')
    return new Promise((resolve, reject) => {
      this.server = createServer((s) => void this.accept(s))
      this.server.once('error', (err) =>
        reject(migrationError(ErrorCode.CONNECT, `cannot listen on ${addr}: ${(err as NodeJS.ErrnoException).code ?? err.message}`, err)),
      )
      this.server.listen(port, host, () => {
        const a = this.server!.address()
        resolve(typeof a === 'object' && a ? a.port : port)
      })
    })
  }

  private async accept(socket: Socket): Promise<void> {
    const ch = new Channel(socket, 'incoming')
    try {
      const info = await serverHandshake(ch, this.token)
      const rejoin = (this.phase === 'recovering' || this.phase === 'settled') && info.session === this.session
      if (this.phase !== 'setup' && !rejoin) throw migrationError(ErrorCode.BUSY, 'a migration is already in progress on this destination')
      if (this.session && info.session !== this.session) throw migrationError(ErrorCode.BUSY, 'a migration from another source is already connecting')
      this.session = info.session
      // recovering: a connection of an attempt that broke half-way gives way to the new one
      const replaced = rejoin ? (info.role === 'urgent' ? this.urgent : this.bulk) : undefined
      if (info.role === 'urgent') {
        if (this.urgent && !rejoin) throw migrationError(ErrorCode.PROTOCOL, 'a second urgent connection for one session')
        this.urgent = ch
        ch.onFrame((f) => this.onUrgent(f))
      } else {
        if (this.bulk && !rejoin) throw migrationError(ErrorCode.PROTOCOL, 'a second bulk connection for one session')
        this.bulk = ch
        ch.limitKernelBuffers(this.binding.setSocketBuffers, BULK_SOCKET_BUFFER_BYTES)
        ch.onFrame((f) => this.onBulk(f))
      }
      ch.onClose((err) => this.onChannelClosed(err, ch))
      ch.detectSilence(this.binding.setSocketLiveness, this.linkTimeoutMs)
      replaced?.close()
    } catch (err) {
      // refused before any page moved; keep listening for a proper source
      ch.sendError(err as Error)
      ch.fail(err as Error)
      if (process.env.UFFD_MIGRATE_DEBUG) console.error(`[uffd-migrate] refused a connection: ${(err as Error).message}`)
    }
  }

  private onChannelClosed(err: Error, ch: Channel): void {
    if (this.phase === 'settled' && ch === this.bulk && (err as UffdMigrateError).cause === undefined) {
      this.server?.close() // the source hung up cleanly after the report: nobody dials in again
    }
    if (this.phase === 'settled' || this.phase === 'failed') return
    if (ch !== this.urgent && ch !== this.bulk) return // a connection of a pair that already broke
    const code = (err as UffdMigrateError).code
    if ((this.phase === 'postcopy' || this.phase === 'recovering') && code === ErrorCode.CONNECTION && this.recoveryTimeoutMs > 0) {
      return this.startRecovery(err)
    }
    this.fail(err)
  }

  /**
   * Post-copy recovery (as QEMU's postcopy-recover): the service runs here and
   * the source holds the pages it lacks, so a broken link is not the end.
   * Threads stay blocked in their faults; the source dials in again with the
   * same session, learns what arrived (RECOVER_STATE) and the open requests
   * are asked again. If it does not come back in time, the migration fails.
   */
  private startRecovery(err: Error): void {
    const wasRecovering = this.phase === 'recovering'
    this.phase = 'recovering'
    for (const ch of [this.urgent, this.bulk]) ch?.fail(err)
    this.urgent = undefined
    this.bulk = undefined
    this.openRequests = [0, 0]
    if (this.readyTimer) clearTimeout(this.readyTimer)
    this.readyTimer = undefined
    this.readyPausedSince = 0
    if (wasRecovering) return
    this.hooks.recovering?.(`the connection broke during post-copy (${err.message}); waiting up to ${this.recoveryTimeoutMs} ms for the source to reconnect`)
    this.recoveryTimer = setTimeout(() => {
      this.fail(migrationError(ErrorCode.CONNECTION, `the connection broke during post-copy and the source did not reconnect within ${this.recoveryTimeoutMs} ms: ${err.message}`))
    }, this.recoveryTimeoutMs)
  }

  /** Both connections are back: tell the source what arrived, ask again for what is still awaited. */
  private onRecover(): void {
    if (!this.urgent || !this.bulk) throw migrationError(ErrorCode.PROTOCOL, 'RECOVER before both connections were back')
    if (this.phase === 'settled') {
      // the link broke as SETTLED left: the report again, nothing else to do
      this.bulk.send(encodeControl(Msg.RECOVER_STATE, { received: [], resumedAtMs: this.resumedAtMs, settled: this.settledReport }))
      return
    }
    clearTimeout(this.recoveryTimer)
    this.recoveryTimer = undefined
    this.phase = 'postcopy'
    const received = this.received.map((m) => Buffer.from(new Uint8Array(m.words.buffer, m.words.byteOffset, m.words.byteLength)))
    this.bulk.send(encodeControl(Msg.RECOVER_STATE, { received, ...(this.resumedAtMs !== undefined ? { resumedAtMs: this.resumedAtMs } : {}) }))
    // requests that were open (their replies may be lost): blocked threads wait on them
    for (let region = 0; region < this.regions.length; region++) {
      const runs: number[] = []
      for (const [first, count] of this.inFlight[region].runs()) runs.push(first, count)
      if (runs.length) this.sendRequest(Msg.PAGE_REQUEST, region, runs, RequestKind.FAULT)
    }
    for (const w of this.waits.values()) this.request(w.region, w.first, w.count, true)
  }

  private fail(err: Error): void {
    if (this.phase === 'failed' || this.phase === 'settled') return
    clearTimeout(this.recoveryTimer)
    this.phase = 'failed'
    this.urgent?.fail(err)
    this.bulk?.fail(err)
    this.server?.close()
    this.hooks.failed(err)
  }

  private expect(f: Frame, ...legal: Phase[]): void {
    if (!legal.includes(this.phase)) {
      throw migrationError(ErrorCode.PROTOCOL, `message type ${f.type} is not legal in phase ${this.phase}`)
    }
  }

  // ---- bulk channel ----------------------------------------------------------

  private onBulk(f: Frame): void {
    try {
      this.handleBulk(f)
    } catch (err) {
      this.bulk?.sendError(err as Error)
      this.fail(err as Error)
    }
  }

  private handleBulk(f: Frame): void {
    switch (f.type) {
      case Msg.REGIONS:
        this.expect(f, 'setup')
        return this.onRegions(decodeControl(f.type, f.payload))
      case Msg.PAGES: {
        this.expect(f, 'precopy', 'postcopy')
        this.pollFaults()
        this.placePages(decodePages(f.payload, this.layout, this.ps))
        return this.throttleBulk()
      }
      case Msg.RANGES:
        this.expect(f, 'precopy', 'postcopy')
        this.pollFaults()
        this.onRanges(f)
        return this.throttleBulk()
      case Msg.ROUND_END:
      case Msg.PRECOPY_END:
        this.expect(f, 'precopy')
        return
      case Msg.HANDOFF:
        this.expect(f, 'precopy')
        this.phase = 'handoff'
        this.onHandoff(decodeControl(f.type, f.payload))
        return
      case Msg.PUSH_END:
        this.expect(f, 'postcopy', 'settled')
        return this.checkSettled()
      case Msg.RECOVER:
        this.expect(f, 'recovering', 'settled')
        return this.onRecover()
      case Msg.ERROR:
        throw peerError(f.payload)
      default:
        throw migrationError(ErrorCode.PROTOCOL, `unexpected message type ${f.type} on the bulk channel`)
    }
  }

  private onRegions(m: Record<string, unknown>): void {
    const pageSize = uint(m, 'pageSize', 'REGIONS', 1 << 30)
    const list = field<unknown[]>(m, 'regions', 'array', 'REGIONS')
    const theirs = list.map((r, i) => {
      if (typeof r !== 'object' || r === null) throw migrationError(ErrorCode.PROTOCOL, `expected REGIONS.regions[${i}] to be a map`)
      const rec = r as Record<string, unknown>
      return { name: field<string>(rec, 'name', 'string', `REGIONS.regions[${i}]`), sizeBytes: uint(rec, 'sizeBytes', `REGIONS.regions[${i}]`) }
    })
    const ours = this.regions.map((r) => ({ name: r.name, sizeBytes: r.sizeBytes }))
    const fmt = (t: { name: string; sizeBytes: number }[]) => t.map((r) => `${r.name}=${r.sizeBytes}`).join(', ')
    if (pageSize !== this.ps || JSON.stringify(theirs) !== JSON.stringify(ours)) {
      throw migrationError(
        ErrorCode.REGIONS,
        `region table mismatch: the source has {${fmt(theirs)}} (page size ${pageSize}), the destination asked for {${fmt(ours)}} (page size ${this.ps}); start the same service with the same region sizes on both hosts`,
      )
    }
    this.linkTimeoutMs = typeof m.linkTimeoutMs === 'number' && m.linkTimeoutMs >= 1000 ? Math.min(m.linkTimeoutMs, 3600_000) : 0
    for (const ch of [this.urgent, this.bulk]) ch?.detectSilence(this.binding.setSocketLiveness, this.linkTimeoutMs)
    this.layout = this.regions.map((r) => ({ pageCount: r.pageCount }))
    this.inFlight = this.regions.map((r) => new PageBitmap(r.pageCount))
    this.knownZero = this.regions.map((r) => new PageBitmap(r.pageCount))
    this.freedHere = this.regions.map((r) => new PageBitmap(r.pageCount))
    // Registered from the start: pre-copy pages are installed with
    // UFFDIO_COPY, and from the hand-off on every missing page faults to us.
    // Nobody touches the regions before the hand-off (the service waits in start()).
    this.uffd = new this.binding.Uffd(0)
    const MISSING = this.binding.constants.UFFDIO_REGISTER_MODE_MISSING
    for (const r of this.regions) this.uffd.register(r.id, 0, r.sizeBytes, MISSING)
    this.uffd.startFaults((ev) => this.onFaults(ev))
    this.phase = 'precopy'
    this.bulk!.send(encodeControl(Msg.REGIONS_OK, {}))
  }

  private markReceived(region: number, first: number, count: number): void {
    const added = this.received[region].setRange(first, count)
    this.receivedCount += added
    if (added < count && this.phase === 'postcopy') {
      // a page freed here while the source had it in flight is not a resend
      let twice = count - added
      for (let p = first; p < first + count && twice > 0; p++) if (this.freedHere[region]?.has(p)) twice--
      this.stats.pagesReceivedTwice += twice
    }
  }

  private placePages(m: { region: number; firstPage: number; pageCount: number; data: Buffer }): void {
    const r = this.regions[m.region]
    const off = m.firstPage * this.ps
    if (this.phase === 'precopy') {
      // A page that holds data already (an older round's) is overwritten in
      // place; a missing one is installed with UFFDIO_COPY: one copy, no
      // zero-fill fault, and never touched by this thread while missing.
      // Present = received and not a known zero page (those were never populated).
      const zero = this.knownZero[m.region]
      const put = (p: number, q: number, present: boolean) => {
        const bytes = m.data.subarray((p - m.firstPage) * this.ps, (q - m.firstPage) * this.ps)
        if (present) new Uint8Array(r.buffer, p * this.ps, bytes.length).set(bytes)
        else this.uffd!.copy(r.id, p * this.ps, bytes)
      }
      this.received[m.region].eachRun(m.firstPage, m.firstPage + m.pageCount, (p, q, got) => {
        if (got) zero.eachRun(p, q, (a, b, isZero) => put(a, b, !isZero))
        else put(p, q, false)
      })
      zero.clearRange(m.firstPage, m.pageCount)
      this.markReceived(m.region, m.firstPage, m.pageCount)
      return
    }
    this.uffd!.copy(r.id, off, m.data)
    this.arrived(m.region, m.firstPage, m.pageCount)
  }

  /** Zero and free ranges alike: pages without payload that read as zero. */
  private onRanges(f: Frame): void {
    const m = decodeRuns(f.type, f.payload, this.layout)
    if (m.kind !== RangeKind.ZERO && m.kind !== RangeKind.FREE) throw migrationError(ErrorCode.PROTOCOL, `unknown range kind ${m.kind}`)
    this.placeZeroRuns(m.region, m.runs)
  }

  private placeZeroRuns(region: number, runs: Uint32Array): void {
    const r = this.regions[region]
    for (let k = 0; k < runs.length; k += 2) {
      const first = runs[k], count = runs[k + 1]
      if (this.phase === 'precopy') {
        // A page that held data from an earlier round is zero now.
        if (this.received[region].nextSet(first, first + count) !== -1) r.discard(first * this.ps, count * this.ps)
        this.knownZero[region].setRange(first, count)
        this.markReceived(region, first, count)
      } else {
        this.uffd!.zeropage(r.id, first * this.ps, count * this.ps)
        this.knownZero[region].setRange(first, count)
        this.arrived(region, first, count)
      }
    }
  }

  /** Post-copy: pages placed; wake ready() waiters, time the faults they answer. */
  private arrived(region: number, first: number, count: number): void {
    this.markReceived(region, first, count)
    if (this.faultStart.size) {
      // a few faults are open at a time: look them up, not every page of the run
      const now = nowMs(), lo = region * 2 ** 32 + first, hi = lo + count
      for (const [key, t] of this.faultStart) {
        if (key < lo || key >= hi) continue
        this.latency.add((now - t) * 1000)
        this.faultStart.delete(key)
      }
    }
    this.inFlight[region].clearRange(first, count)
    if (this.waits.size) this.wakeWaits(region, first, count)
    this.checkSettled()
  }

  /** Applies the discard list and registers MISSING, then resumes the service. */
  private onHandoff(m: Record<string, unknown>): void {
    const state = field<Uint8Array>(m, 'state', 'bytes', 'HANDOFF')
    const discard = field<unknown[]>(m, 'discard', 'array', 'HANDOFF')
    if (discard.length !== this.regions.length) {
      throw migrationError(ErrorCode.PROTOCOL, `expected HANDOFF.discard for ${this.regions.length} regions, got ${discard.length}`)
    }
    for (let i = 0; i < discard.length; i++) {
      const d = discard[i]
      if (!(d instanceof Uint8Array) || d.length % 8 !== 0) throw migrationError(ErrorCode.PROTOCOL, `expected HANDOFF.discard[${i}] to be 8k bytes`)
      // little-endian u32 pairs (copied: msgpackr may hand out a view of a shared pool)
      const runs = new Uint32Array(d.buffer.slice(d.byteOffset, d.byteOffset + d.byteLength))
      for (let k = 0; k < runs.length; k += 2) {
        const first = runs[k], count = runs[k + 1]
        if (count === 0 || first >= this.layout[i].pageCount || count > this.layout[i].pageCount - first) {
          throw migrationError(ErrorCode.PROTOCOL, `expected discard runs inside region ${i}, got ${first}+${count}`)
        }
        this.regions[i].discard(first * this.ps, count * this.ps)
        this.receivedCount -= this.received[i].clearRange(first, count)
        this.knownZero[i].clearRange(first, count)
      }
    }
    this.recoveryTimeoutMs = typeof m.recoveryTimeoutMs === 'number' && m.recoveryTimeoutMs > 0 ? Math.min(m.recoveryTimeoutMs, 24 * 3600_000) : 0
    this.phase = 'postcopy'
    this.hooks.restore(state).then((resumedAtMs) => {
      this.resumedAtMs = resumedAtMs
      this.bulk?.send(encodeControl(Msg.RESUMED, { resumedAtMs }))
      this.checkSettled()
    })
  }

  // ---- faults ---------------------------------------------------------------------

  /**
   * Post-copy: a stretch of pushed frames keeps this loop busy for a
   * millisecond or more before the uv_poll sees a fault; look before each
   * frame (one read() that usually answers EAGAIN) so the request goes out now.
   */
  private pollFaults(): void {
    if (this.phase === 'postcopy') this.uffd?.pollFaults()
  }

  private onFaults(ev: Uint32Array): void {
    const now = nowMs()
    const requests = new Map<number, number[]>()
    for (let i = 0; i < ev.length; i += 3) {
      const region = this.regionIndex.get(ev[i])
      if (region === undefined) continue
      const page = ev[i + 1]
      this.resolveFault(region, page, now, requests)
    }
    for (const [region, pages] of requests) this.sendRequest(Msg.PAGE_REQUEST, region, pages, RequestKind.FAULT)
  }

  private resolveFault(region: number, page: number, now: number, requests: Map<number, number[]>): void {
    const r = this.regions[region]
    if (this.received[region].has(page)) {
      // Known zero (never populated, all-zero or freed): place it here.
      // A page placed since the fault was raised answers EEXIST: just wake.
      if (this.uffd!.zeropage(r.id, page * this.ps, this.ps) > 0) this.uffd!.wake(r.id, page * this.ps, this.ps)
      else this.stats.localZeroFaults++
      return
    }
    if (this.inFlight[region].has(page)) return // already asked for: one request per page
    this.inFlight[region].set(page)
    this.stats.networkFaults++
    if (this.knownZero[region].has(page)) this.stats.networkFaultsOnZeroPages++
    this.faultStart.set(region * 2 ** 32 + page, now)
    const list = requests.get(region) ?? []
    list.push(page, 1)
    requests.set(region, list)
  }

  /** ready() from the service: answers once the range is local, asking for it with urgent priority. */
  waitFor(id: number, region: number, first: number, count: number): void {
    if (this.phase === 'settled' || this.received[region].allSet(first, count)) return this.hooks.ready([id])
    this.waits.set(id, { region, first, count })
    this.request(region, first, count, true)
  }

  private wakeWaits(region: number, first: number, count: number): void {
    const done: number[] = []
    for (const [id, w] of this.waits) {
      if (w.region !== region || w.first >= first + count || w.first + w.count <= first) continue
      if (this.received[region].allSet(w.first, w.count)) done.push(id)
    }
    for (const id of done) this.waits.delete(id)
    if (done.length) this.hooks.ready(done)
  }

  /** ready()/willNeed() from the service: ask for the missing pages of a range now. */
  request(region: number, first: number, count: number, urgent: boolean): void {
    if (this.phase !== 'postcopy' || !this.urgent) return
    const runs: number[] = []
    const map = this.received[region]
    for (let p = map.nextClear(first, first + count); p !== -1; p = map.nextClear(p + 1, first + count)) {
      let end = map.nextSet(p, first + count)
      if (end === -1) end = first + count
      if (urgent) {
        // only the pages nobody asked for yet
        for (let q = p; q < end; q++) {
          if (this.inFlight[region].has(q)) continue
          this.inFlight[region].set(q)
          runs.push(q, 1)
        }
      } else {
        runs.push(p, end - p)
      }
      p = end
    }
    if (runs.length) this.sendRequest(urgent ? Msg.PAGE_REQUEST : Msg.WILL_NEED, region, runs, RequestKind.READY)
  }

  /**
   * While a page request is open, the page must not queue behind megabytes of
   * push on this event loop. REQUEST_DONE (after the replies, on the urgent
   * channel) closes a request. A blocked thread's fault throttles bulk reading
   * to one frame per turn of the loop (throttleBulk); ready() requests pause
   * it for at most READY_PAUSE_MS at a time, then let it run as long: a
   * service that asks all the time must not starve the push.
   */
  private sendRequest(type: Msg, region: number, runs: number[], kind: RequestKind): void {
    if (!this.urgent) return
    this.urgent.send(encodeRuns(type, kind, region, runs))
    if (type !== Msg.PAGE_REQUEST) return
    this.openRequests[kind]++
    this.updateBulkPause()
  }

  private requestDone(m: Record<string, unknown>): void {
    const kind = uint(m, 'kind', 'REQUEST_DONE', 1) as RequestKind
    if (this.openRequests[kind] === 0) throw migrationError(ErrorCode.PROTOCOL, 'REQUEST_DONE without an open request')
    this.openRequests[kind]--
    this.updateBulkPause()
  }

  /**
   * While a fault's request is open, bulk data is read one frame per turn of
   * the loop: the reply on the urgent channel then waits behind one frame at
   * most, not behind the megabytes libuv reads from a busy socket in one go,
   * and the push keeps flowing (on a fast link the destination's install rate
   * is the bottleneck: a full stop per fault cost most of the push).
   */
  private throttleBulk(): void {
    if (this.phase !== 'postcopy' || this.bulkYielding || this.openRequests[RequestKind.FAULT] === 0) return
    this.bulkYielding = true
    this.updateBulkPause()
    setImmediate(() => {
      this.bulkYielding = false
      this.updateBulkPause()
    })
  }

  private updateBulkPause(): void {
    const now = nowMs()
    let pause = this.bulkYielding
    if (!pause && this.openRequests[RequestKind.READY] > 0 && now >= this.readyHoldoffUntil) {
      if (this.readyPausedSince === 0) this.readyPausedSince = now
      if (now - this.readyPausedSince < READY_PAUSE_MS) {
        pause = true
        this.readyTimer ??= setTimeout(() => {
          this.readyTimer = undefined
          this.updateBulkPause()
        }, READY_PAUSE_MS)
      } else {
        this.readyHoldoffUntil = now + READY_PAUSE_MS
        this.readyPausedSince = 0
      }
    }
    if (!pause || this.openRequests[RequestKind.READY] === 0) this.readyPausedSince = 0
    const socket = this.bulk?.socket
    if (!socket) return
    if (pause && !socket.isPaused()) socket.pause()
    else if (!pause && socket.isPaused()) socket.resume()
  }

  /**
   * The service freed a range during post-copy: pages not here yet are
   * zero-filled locally and the source is told not to push them.
   */
  free(region: number, first: number, count: number): void {
    if (this.phase !== 'postcopy' || !this.uffd) return
    const r = this.regions[region]
    const runs: number[] = []
    const map = this.received[region]
    for (let p = map.nextClear(first, first + count); p !== -1; p = map.nextClear(p + 1, first + count)) {
      let end = map.nextSet(p, first + count)
      if (end === -1) end = first + count
      this.uffd.zeropage(r.id, p * this.ps, (end - p) * this.ps)
      this.freedHere[region].setRange(p, end - p)
      runs.push(p, end - p)
      this.arrived(region, p, end - p)
      p = end
    }
    if (runs.length) this.bulk?.send(encodeRuns(Msg.FREED, RangeKind.FREE, region, runs))
  }

  // ---- urgent channel ------------------------------------------------------------

  private onUrgent(f: Frame): void {
    try {
      switch (f.type) {
        case Msg.CLOCK: {
          this.expect(f, 'setup', 'precopy')
          const t0 = field<number>(decodeControl(f.type, f.payload), 't0', 'number', 'CLOCK')
          this.urgent!.send(encodeControl(Msg.CLOCK, { t0, t1: nowMs() }))
          return
        }
        case Msg.PAGES:
          this.expect(f, 'postcopy', 'settled')
          return this.placePages(decodePages(f.payload, this.layout, this.ps))
        case Msg.RANGES:
          this.expect(f, 'postcopy', 'settled')
          return this.onRanges(f)
        case Msg.REQUEST_DONE:
          this.expect(f, 'postcopy', 'settled')
          return this.requestDone(decodeControl(f.type, f.payload))
        case Msg.ERROR:
          throw peerError(f.payload)
        default:
          throw migrationError(ErrorCode.PROTOCOL, `unexpected message type ${f.type} on the urgent channel`)
      }
    } catch (err) {
      this.urgent?.sendError(err as Error)
      this.fail(err as Error)
    }
  }

  // ---- settled ----------------------------------------------------------------------

  private checkSettled(): void {
    if (this.phase !== 'postcopy' || this.receivedCount < this.totalPages) return
    this.phase = 'settled'
    if (this.uffd) {
      // Everything with data is present; what is left are known-zero pages,
      // which plain anonymous memory fills by itself once unregistered.
      for (const r of this.regions) this.uffd.unregister(r.id, 0, r.sizeBytes)
      this.uffd.close()
      this.uffd = undefined
    }
    if (this.waits.size) this.hooks.ready([...this.waits.keys()])
    this.waits.clear()
    this.settledReport = { ...this.stats, faultLatencyUs: this.latency.summary() }
    this.bulk?.send(encodeControl(Msg.SETTLED, this.settledReport))
    // Keep listening a while: if the link broke as SETTLED left, the source
    // dials in again to learn it (onRecover); a clean hang-up closes it sooner.
    if (this.recoveryTimeoutMs > 0) setTimeout(() => this.server?.close(), this.recoveryTimeoutMs).unref()
    else this.server?.close()
    this.hooks.settled()
    // the source closes both connections once it has the report
  }

  close(): void {
    this.server?.close()
    this.urgent?.close()
    this.bulk?.close()
    this.uffd?.close()
  }
}

