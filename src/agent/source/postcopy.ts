/**
 * Post-copy on the source: the service runs on the destination, which
 * fetches what it faults on (PAGE_REQUEST, answered on the urgent channel
 * with the still-pending pages, then REQUEST_DONE) while the push policy
 * streams the rest on the bulk channel. A broken link is not the end (the
 * destination runs the service and this process holds the pages it lacks):
 * dial again for up to recoveryTimeoutMs with the same session, learn what
 * arrived (RECOVER_STATE) and push the rest.
 */
import { PageBitmap } from '../../bitmap'
import { ErrorCode, migrationError, type UffdMigrateError } from '../../errors'
import type { Channel } from '../../protocol/channel'
import type { Frame } from '../../protocol/frames'
import { decodeControl, decodeRuns, encodeControl, field, Msg, type RegionLayout, RequestKind } from '../../protocol/messages'
import { type Clock, sleep } from '../clock'
import { nativeLinkError } from '../demand-events'
import { takeDuplex } from '../native-seal'
import type { PrepagingOptions } from '../prepaging'
import { createPushPolicy } from '../prepaging'
import type { PushPolicy, PushRun } from '../push-policy'
import type { Sender } from './sender'
import { askAgain, Fate, type HandoffFate } from './handoff-fate'
import { breaksLinkOnly, brokenLinkCause, isProtocolBreak } from '../broken-link'
import { LAST_WORDS_MS, type SourceLink } from './link'

/**
 * Pages the push policy picks per turn of the push loop (1 MiB): page
 * requests are read between turns. Smaller turns cut bubbling's runs into
 * small frames, whose per-frame costs on both sides slowed the push.
 */
const BATCH_PAGES = 256

/** A takeover asks the destination for at least this long, whatever recoveryTimeoutMs says (Postcopy.takeOver()); so does a failure of this side's own before RESUMED (handoff-fate.ts). */
export const TAKEOVER_ASK_MS = 10_000

export interface PostcopyHost {
  readonly link: SourceLink
  readonly failure: Error | undefined
  /** Dials both connections again (same session); they become `link`, not routed yet. */
  reconnect(): Promise<SourceLink>
  /** The link broke: phase recovering. */
  recovering(): void
  /** The new link is usable: phase postcopy again, frames routed; rejects when it breaks. */
  resumeLink(): Promise<never>
  /** Where the service runs (the destination's answers here move it). */
  readonly fate: HandoffFate
}

export class Postcopy {
  policy: PushPolicy | undefined
  readonly pushLog: PushRun[] = []
  pushed = 0
  demand = 0
  /** The demand connection's native threads served the faults. */
  nativeDemand = false
  recoveries = 0
  /** From the last RECOVER_STATE: the destination's clock against this side's (offset, ms). */
  recoverClock: { offsetMs: number; rttMs: number } | undefined
  /** From RESUMED (destination clock): when HANDOFF arrived and when its discard list was applied. */
  destHandoff: { handoffAtMs: number; discardedAtMs: number } | undefined
  /** SourceOptions.demandStallMs, until the first demand connection took it. */
  private demandStallMs: number
  /** Bumped when a link breaks: work started on the old link stops. */
  private generation = 0
  /**
   * The destination's SETTLED report. Made here, not when the push ends: a
   * destination that lacks nothing settles as soon as it resumes, and its
   * SETTLED may arrive (with RESUMED) before this side has seen its HANDOFF
   * drain; a report with nobody waiting for it yet is kept, not dropped.
   */
  readonly settled: Promise<Record<string, unknown>>
  private settledWaiter!: { resolve: (stats: Record<string, unknown>) => void; reject: (e: Error) => void }
  readonly resumedAt: Promise<number>
  private resumedResolve!: (t: number) => void
  /** RESUMED came (or a RECOVER_STATE's resume time): a destination settles only after it, so SETTLED may follow. */
  private resumed = false

  constructor(
    private readonly sender: Sender,
    private readonly layout: RegionLayout[],
    private readonly clock: Clock,
    private readonly opts: { prepaging: PrepagingOptions; pushLog: boolean; recoveryTimeoutMs: number; linkTimeoutMs: number; demandStallMs?: number },
    private readonly host: PostcopyHost,
  ) {
    this.demandStallMs = opts.demandStallMs ?? 0
    this.resumedAt = new Promise((resolve) => (this.resumedResolve = resolve))
    this.settled = new Promise((resolve, reject) => (this.settledWaiter = { resolve, reject }))
    this.settled.catch(() => {}) // observed by run(); a failure may come before anyone waits
  }

  /** From the hand-off (or a recovery): a fresh push policy over what is pending; a native thread answers faults when the link has a demand connection. */
  start(): void {
    this.policy = createPushPolicy(this.opts.prepaging, this.sender.pending)
    this.host.link.enterPostcopy()
    const demand = this.host.link.demand
    if (!demand) return
    // after a recovery the destination's thread asks again at once: requests may wait in this side's buffers
    const taken = takeDuplex(demand)
    if (!taken) return demand.fail(migrationError(ErrorCode.PROTOCOL, 'the demand connection has no descriptor'))
    this.nativeDemand = true
    const serve = () => this.sender.serveDemand(taken, {
      onFault: (region, page) => this.policy?.onFault(region, page),
      onSent: (pages) => (this.demand += pages),
      onClosed: (errno, protocol) => demand.fail(nativeLinkError(errno, protocol)),
    })
    // the test hook: the destination's service waits in a fault that long (test/agent-takeover.e2e.test.ts)
    if (!this.demandStallMs) return serve()
    const generation = this.generation
    this.clock.setTimeout(() => generation === this.generation && serve(), this.demandStallMs) // (after a break: the link's own)
    this.demandStallMs = 0
  }

  // ---- messages (named in machine.ts) --------------------------------------------

  onPageRequest(f: Frame): void {
    const { kind, region, runs } = decodeRuns(f.type, f.payload, this.layout)
    // (echoed in REQUEST_DONE: an unknown one failed the destination there, after its service had started)
    if (kind !== RequestKind.READY && kind !== RequestKind.FAULT) throw migrationError(ErrorCode.PROTOCOL, `expected a PAGE_REQUEST of kind 0 (ready) or 1 (fault), got ${kind}`)
    void this.answerRequest(kind, region, runs)
  }

  onWillNeed(f: Frame): void {
    const { region, runs } = decodeRuns(f.type, f.payload, this.layout)
    for (let k = 0; k < runs.length; k += 2) this.policy?.onHint(region, runs[k], runs[k + 1])
  }

  onResumed(f: Frame): void {
    const m = decodeControl(f.type, f.payload)
    // the destination's side of the pause window (its clock): HANDOFF arrived, discard list applied
    if (typeof m.handoffAtMs === 'number' && typeof m.discardedAtMs === 'number') this.destHandoff = { handoffAtMs: m.handoffAtMs, discardedAtMs: m.discardedAtMs }
    this.onResumeTime(field<number>(m, 'resumedAtMs', 'number', 'RESUMED'))
  }

  private onResumeTime(t: number): void {
    this.resumed = true
    this.host.fate.arrived()
    this.resumedResolve(t)
  }

  /**
   * A settled report must come after the resume: this side waits for the resume time before it ends, and stops
   * watching a settled destination (it is quiet), so one that skipped RESUMED left the source waiting for ever, its
   * memory held (found by the source-side fuzzer: a RESUMED turned into a SETTLED).
   */
  private checkSettledAfterResume(): void {
    if (!this.resumed) throw migrationError(ErrorCode.PROTOCOL, 'the destination said SETTLED before RESUMED: a destination settles only once its service runs')
  }

  /** The destination freed pages during post-copy: it zero-fills them; never push them. */
  onFreed(f: Frame): void {
    const { region, runs } = decodeRuns(f.type, f.payload, this.layout)
    this.sender.dropPending(region, runs)
  }

  onSettled(f: Frame): void {
    this.checkSettledAfterResume()
    this.host.link.unwatchPeer() // a settled destination is quiet
    this.settledStats = decodeControl(f.type, f.payload)
    this.settledWaiter.resolve(this.settledStats)
  }

  private settledStats: Record<string, unknown> | undefined

  /**
   * A failure after the hand-off that recovery takes: a broken link; or, until the destination confirmed the hand-off
   * (RESUMED), a frame that broke the protocol. Then whether HANDOFF took effect there is not known here, and ending
   * the migration at once left the service running nowhere: this side's channel had told the destination ERROR on
   * urgent, which overtook HANDOFF on bulk, so the destination ended its session before the hand-off, while this side,
   * committed, kept its service paused (found by the source-side fuzzer over TCP, ~2 % of its sessions). Recovery asks
   * the destination: NO_SESSION (it never took the hand-off) resumes the service here. Once the hand-off is known to
   * have arrived (RESUMED, or a recovery's answer), such frames count toward broken-link.ts's budget: the service runs
   * there on our pages, and a buggy destination that repeats itself ends the migration at the fourth.
   */
  recoverable(err: Error): boolean {
    const fate = this.host.fate
    return fate.mayRunThere && breaksLinkOnly(err, fate.is(Fate.THERE) ? this.protocolBreaks : 0)
  }

  /** Frames from the destination that broke the protocol after the hand-off, each recovered (broken-link.ts's budget). */
  protocolBreaks = 0

  /** The destination reported an error: whatever waits for the settled report fails with it. */
  onPeerFailure(err: Error): void {
    this.settledWaiter.reject(err)
  }

  // ---- the loop ------------------------------------------------------------------

  /**
   * Until the destination has settled: push, answer requests, and recover a
   * broken link. Resolves with the destination's resume time and its report.
   */
  async run(failed: Promise<never>): Promise<[number, Record<string, unknown>]> {
    for (;;) {
      try {
        return await Promise.race([Promise.all([this.resumedAt, this.pushUntilSettled(this.generation)]), failed])
      } catch (err) {
        if (this.host.failure || !this.recoverable(err as Error)) throw err
        const settled = await this.lastWords()
        if (settled) return [await this.resumedAt, settled]
        if (this.opts.recoveryTimeoutMs <= 0) throw err
        const back = await this.recover(err as Error)
        if (back.settled) return [await this.resumedAt, back.settled] // it settled as the link broke
        failed = back.failed
      }
    }
  }

  /**
   * The SETTLED report if it arrives within the link's last words; the destination's ERROR read meanwhile (handled:
   * `settled` rejects with it; or taken by a reader that was given up: the link keeps it) is thrown, nothing to recover.
   */
  private async lastWords(): Promise<Record<string, unknown> | undefined> {
    if (this.settledStats) return this.settledStats
    const said = await Promise.race([this.settled.then(() => undefined, (err: Error) => err), this.host.link.lastWords(LAST_WORDS_MS)])
    if (!this.settledStats && said) throw said
    return this.settledStats
  }

  private async pushUntilSettled(generation: number): Promise<Record<string, unknown>> {
    // Not before the service runs there (RESUMED): until then the destination's bulk reader is paused, and what
    // was pushed piles up in a receive buffer shrunk to post-copy's size under a window advertised for pre-copy's;
    // the kernel then drops segments and the push stalls for a retransmission timeout (200 ms on loopback), with
    // faults on pages it carries waiting as long (bench:postcopy D: one run in ~8). Faults are answered meanwhile.
    await this.resumedAt
    if (this.sender.pending.length) await this.pushLoop(generation)
    if (generation !== this.generation) return new Promise(() => {}) // that link broke; recover() took over
    this.host.link.bulk.send(encodeControl(Msg.PUSH_END, {}))
    return this.settled
  }

  private async pushLoop(generation: number): Promise<void> {
    const bulk = this.host.link.bulk
    for (;;) {
      if (this.host.failure) throw this.host.failure
      if (generation !== this.generation) return
      const runs = this.policy!.next(BATCH_PAGES)
      if (runs.length === 0) {
        if (this.sender.pagesLeft === 0) return
        // demand-only policy: wait for requests to drain the rest
        await sleep(this.clock, 5)
        continue
      }
      if (this.opts.pushLog) this.pushLog.push(...runs)
      // consecutive runs of one region go together (the native writer takes them as one batch)
      for (let k = 0; k < runs.length;) {
        if (generation !== this.generation) return
        let end = k + 1
        while (end < runs.length && runs[end].region === runs[k].region) end++
        const { data, zero } = await this.sender.sendRuns(bulk, runs[k].region, runs.slice(k, end).map((r): [number, number] => [r.firstPage, r.pageCount]), true)
        this.pushed += data + zero
        k = end
      }
      // let page requests in between batches
      await new Promise<void>((r) => this.clock.setImmediate(r))
    }
  }

  /**
   * Replies on the urgent channel with the requested pages still pending (a
   * page already pushed is in flight on the bulk channel and is not sent
   * twice), then REQUEST_DONE: while a request is open the destination reads
   * bulk data one frame per turn, so that a fault waits behind one pushed frame at most.
   */
  private async answerRequest(kind: number, region: number, runs: Uint32Array): Promise<void> {
    // the channel this request came on: after a break its replies go nowhere
    // (the destination asks again), never on the next link
    const ch: Channel = this.host.link.urgent, generation = this.generation
    const map = this.sender.pending[region]
    for (let k = 0; k < runs.length; k += 2) {
      const first = runs[k], end = runs[k] + runs[k + 1]
      this.policy!.onFault(region, first)
      for (let p = map.nextSet(first, end); p !== -1 && generation === this.generation; p = map.nextSet(p, end)) {
        let q = map.nextClear(p, end)
        if (q === -1) q = end
        const { data, zero } = await this.sender.sendRun(ch, region, p, q - p, true)
        this.demand += data + zero
        p = q
      }
    }
    if (generation === this.generation) ch.send(encodeControl(Msg.REQUEST_DONE, { kind }))
  }

  // ---- recovery ------------------------------------------------------------------

  /**
   * A new agent takes over a migration whose agent crashed with the service paused (MigrationSource.takeOver()):
   * nothing of the old link is left here, so it dials in as after a break; the rest is run()'s.
   */
  async takeOver(cause: Error): Promise<[number, Record<string, unknown>]> {
    // asked even with recovery turned off (recoveryTimeoutMs 0): a destination that never got HANDOFF says so, and
    // the service resumes here instead of running nowhere
    const back = await this.dialBack(cause, Math.max(this.opts.recoveryTimeoutMs, TAKEOVER_ASK_MS))
    if (back.settled) return [await this.resumedAt, back.settled]
    return this.run(back.failed)
  }

  /** Why the link last broke after the hand-off (progress and the log say it while recovering). */
  brokenBy = ''

  /** The link broke: drop it and dial back. */
  private recover(cause: Error): Promise<{ failed: Promise<never>; settled?: Record<string, unknown> }> {
    this.generation++ // the push loop and the replies of the broken link stop
    this.sender.stopDemand()
    this.host.link.close()
    this.recoveries++
    if (isProtocolBreak(cause)) this.protocolBreaks++
    this.brokenBy = brokenLinkCause(cause, this.protocolBreaks)
    this.host.recovering()
    return this.dialBack(cause, this.opts.recoveryTimeoutMs)
  }

  /** Dials the destination again for up to timeoutMs; resolves with the new link's failure promise (boxed: an awaited promise would be unwrapped). */
  private async dialBack(cause: Error, timeoutMs: number): Promise<{ failed: Promise<never>; settled?: Record<string, unknown> }> {
    try {
      return await askAgain({ open: () => this.host.reconnect(), clock: this.clock, linkTimeoutMs: this.opts.linkTimeoutMs, forMs: timeoutMs, cause }, (link, m, askedAt) => {
        this.host.fate.arrived()
        // one clock sample (the takeover's report has no other): the destination's clock when it answered
        if (typeof m.atMs === 'number') this.recoverClock = { offsetMs: m.atMs - (askedAt + this.clock.now()) / 2, rttMs: this.clock.now() - askedAt }
        if (typeof m.resumedAtMs === 'number') this.onResumeTime(m.resumedAtMs)
        const settled = typeof m.settled === 'object' && m.settled !== null ? (m.settled as Record<string, unknown>) : undefined
        if (settled) this.checkSettledAfterResume()
        else {
          this.applyRecoverState(m)
          link.watchPeer()
        }
        return { failed: this.host.resumeLink(), settled }
      })
    } catch (err) {
      if ((err as UffdMigrateError).code !== ErrorCode.NO_SESSION) {
        this.host.fate.askedInVain()
        throw migrationError(ErrorCode.CONNECTION, `the connection broke during post-copy (${cause.message}) and could not be re-established within ${timeoutMs} ms: ${(err as Error).message}`)
      }
      this.host.fate.lost() // (the service resumes here: the migration fails with this NO_SESSION)
      throw err
    }
  }

  /** Pending from now on: every page the destination does not hold (pages lost in flight go again). */
  private applyRecoverState(m: Record<string, unknown>): void {
    const received = field<unknown[]>(m, 'received', 'array', 'RECOVER_STATE')
    if (received.length !== this.layout.length) throw migrationError(ErrorCode.PROTOCOL, `expected RECOVER_STATE.received for ${this.layout.length} regions`)
    this.sender.setPending(this.layout.map((r, i) => {
      const bytes = received[i]
      const wordCount = Math.ceil(r.pageCount / 32)
      if (!(bytes instanceof Uint8Array) || bytes.length !== wordCount * 4) {
        throw migrationError(ErrorCode.PROTOCOL, `expected RECOVER_STATE.received[${i}] of ${wordCount * 4} bytes`)
      }
      // copied: msgpackr may hand out an unaligned view of a shared pool
      const has = new Uint32Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength))
      return PageBitmap.complementOf(has, r.pageCount)
    }))
    this.start()
  }
}
