/**
 * The destination side of one migration, in the agent's worker: one state machine (machine.ts) fed by both connections'
 * frames. Pages go straight into the registered regions before the hand-off; after it faults become page requests and
 * pages go in with UFFDIO_COPY / ZEROPAGE. Settled = every page is local. This file handles the messages, recovery and
 * a takeover; session.ts holds the session's parts and their lifecycle; beside them, one file per concern.
 */
import { ErrorCode, migrationError } from '../../errors'
import type { Channel } from '../../protocol/channel'
import type { Frame } from '../../protocol/frames'
import { peerError } from '../../protocol/handshake'
import { decodeControl, decodePages, decodeRuns, encodeControl, field, Msg, RequestKind, uint } from '../../protocol/messages'
import { postcopyBulkSocket } from '../socket-settings'
import { route } from '../message-table'
import { peerPostcopyNice } from '../yielding'
import { DEST_MESSAGES, DestPhase, type DestinationHandlers } from './machine'
import { type Headroom, refuseUnlessRoom } from '../../memory-headroom'
import { acceptRegionTable, isPreflight } from './region-table'
import { DestinationSession } from './session'
import type { AgentWill } from './takeover'

export { DestPhase } from './machine'
export type { DestinationHooks, DestinationOptions } from './hooks'
export class MigrationDestination extends DestinationSession implements DestinationHandlers {
  /** Every frame after the handshake: the message table says whether it is legal here and now. */
  protected onFrame(ch: Channel, role: 'urgent' | 'bulk', f: Frame): void {
    try {
      const rule = route(DEST_MESSAGES, 'destination', this.phase, role, f.type)
      // pushed data in post-copy: a stretch of it keeps this loop busy for milliseconds, so faults (one read(),
      // usually EAGAIN) and the service's calls are taken before each frame; the gate may yield after it
      const pushed = role === 'bulk' && (f.type === Msg.PAGES || f.type === Msg.RANGES) && this.phase === DestPhase.POSTCOPY
      if (pushed) {
        this.uffd?.pollFaults()
        this.hooks.pollService?.()
      }
      rule.handle!(this, f)
      if (pushed && this.phase === DestPhase.POSTCOPY) this.gate.afterFrame()
    } catch (err) {
      this.linkBroke(err as Error, ch) // (after the hand-off a malformed frame is recovered, a few times)
    }
  }

  // ---- message handlers (named in machine.ts) -------------------------------

  onRegions(f: Frame): void {
    this.preflightAsked = isPreflight(f) // (before its checks: one that fails them is a preflight that failed)
    const limits = this.applyLimits(acceptRegionTable(f, this.regions, this.ps))
    // before anything is placed: a guest that cannot fit fails now, not half-way or after the hand-off
    const room = this.opts.memoryHeadroom?.()
    if (limits.residentBytes !== undefined) refuseUnlessRoom(limits.residentBytes, room)
    if (limits.preflight) return this.answerPreflight(limits.residentBytes, room, limits.streams)
    this.cpuAtRegionsMs = this.binding.threadCpuMs?.()
    // Registered from the start: pre-copy pages go in with UFFDIO_COPY, then every missing page faults to us
    this.uffd = new this.binding.Uffd(0)
    const MISSING = this.binding.constants.UFFDIO_REGISTER_MODE_MISSING
    for (const r of this.regions) this.uffd.register(r.id, 0, r.sizeBytes, MISSING)
    this.readFaults(this.uffd, limits.precopyOnly)
    this.bulkPath.start(this.uffd, this.placement, this.link.bulk!)
    this.link.streamsAllowed = this.bulkPath.streamsFor(limits.streams)
    this.machine.transition(DestPhase.PRECOPY)
    const bulk = this.link.bulk!, ok = () => bulk.send(encodeControl(Msg.REGIONS_OK, { streams: this.link.streamsAllowed + 1, batch: true }))
    const preparing = this.hooks.incoming?.({ peer: this.link.sessionPeer, servesHttp: limits.servesHttp, session: this.link.sessionId!, encrypted: this.link.bulk!.sealed })
    if (preparing) void preparing.then(() => bulk === this.link.bulk && this.phase === DestPhase.PRECOPY && ok())
    else ok()
  }

  /**
   * A preflight (send --dry-run): every check of REGIONS passed. The answer says what this side found, and the session
   * ends quietly (its connections end after the answer left; nothing was registered or placed).
   */
  private answerPreflight(residentBytes: number | undefined, room: Headroom | undefined, streams: unknown): void {
    const session = this.link.sessionId!, peer = this.link.sessionPeer
    this.link.bulk!.send(encodeControl(Msg.PREFLIGHT_OK, { ...(room ? { headroomBytes: room.bytes, limitedBy: room.limitedBy } : {}), streams: this.bulkPath.streamsFor(streams, this.bulkPath.readerWouldRun(this.link.bulk!)) + 1 }))
    this.hooks.preflight?.({ peer, session, residentBytes, room })
    this.endSession(migrationError(ErrorCode.ABORTED, 'the preflight check is done'), true)
  }

  onClock(f: Frame): void {
    this.link.urgent!.send(encodeControl(Msg.CLOCK, { t0: field<number>(decodeControl(f.type, f.payload), 't0', 'number', 'CLOCK'), t1: this.clock.now() }))
  }

  onPages(f: Frame): void {
    this.placement.pages(decodePages(f.payload, this.layout, this.ps), this.phase !== DestPhase.PRECOPY)
  }

  onRanges(f: Frame): void {
    this.placement.ranges(decodeRuns(f.type, f.payload, this.layout), this.phase !== DestPhase.PRECOPY)
  }

  /** Applies the discard list, then resumes the service. */
  onHandoff(f: Frame): void {
    const handoffAtMs = this.clock.now(), m = decodeControl(f.type, f.payload)
    const state = field<Uint8Array>(m, 'state', 'bytes', 'HANDOFF')
    // (checked before anything is applied: a malformed or missing one, taken for 0, turned recovery off for a service
    // that then ran here, and a reset lost it; the fuzzer's msgpackType, and a bit flip in the key's name)
    const recoveryTimeoutMs = Math.min(field<number>(m, 'recoveryTimeoutMs', 'number', 'HANDOFF'), 24 * 3600_000)
    if (recoveryTimeoutMs < 0) throw migrationError(ErrorCode.PROTOCOL, `expected HANDOFF.recoveryTimeoutMs of 0 or more, got ${recoveryTimeoutMs}`)
    this.bulkPath.endStreams() // quiet since the source's barrier; nothing reaches the service's memory through them now
    this.placement.applyDiscard(field<unknown[]>(m, 'discard', 'array', 'HANDOFF'))
    const discardedAtMs = this.clock.now()
    this.recovery.timeoutMs = recoveryTimeoutMs
    this.machine.transition(DestPhase.POSTCOPY)
    this.notes.heldFd = this.uffd?.holdRegistrations?.() // the service runs on missing pages from now: only the settle ends the registrations
    if (this.link.bulk) postcopyBulkSocket(this.link.bulk, this.binding, this.opts.bulkBufferBytes)
    this.notes.postcopy = { nice: peerPostcopyNice(m.postcopyNice), forwarded: m.forward === true } // (in the will from here)
    this.hooks.restore(state).then(
      (resumedAtMs) => this.resumed(resumedAtMs, { handoffAtMs, discardedAtMs }),
      (err: Error) => {
        // The service did not start here: the source may (and does) resume its own.
        const e = migrationError(ErrorCode.HANDOFF, `the destination could not restore the hand-off state (${err.message}); the service did not start there`)
        this.link.bulk?.sendError(e)
        this.fail(e)
      },
    )
  }

  /** The service runs here: the restore's answer, or (handoff undefined) the main thread's word to an agent that took over before it heard. */
  resumed(resumedAtMs: number, handoff?: { handoffAtMs: number; discardedAtMs: number }): void {
    if (this.recovery.resumedAtMs !== undefined) return
    // the push is placed once the service runs (in the pause window it took CPU from the restore; faults never wait for it)
    this.bulkPath.resume()
    this.hooks.postcopy?.(this.notes.postcopy.nice, this.notes.postcopy.forwarded) // the rest is background work
    this.recovery.resumedAtMs = resumedAtMs
    // (recovering: RECOVER_STATE says it)
    if (this.phase === DestPhase.POSTCOPY) this.link.bulk?.send(encodeControl(Msg.RESUMED, { resumedAtMs, ...handoff }))
    this.hooks.milestone?.({ kind: 'resumed', peer: this.link.sessionPeer, afterHandoffMs: handoff && resumedAtMs - handoff.handoffAtMs, pagesLeft: this.placement.pagesLeft })
    this.checkSettled()
  }

  onSync(): void {
    this.link.bulk!.send(encodeControl(Msg.SYNC, {}))
  }

  onRequestDone(f: Frame): void {
    this.gate.done(uint(decodeControl(f.type, f.payload), 'kind', 'REQUEST_DONE', 1) as RequestKind)
  }

  onPeerError(f: Frame): never {
    throw peerError(f.payload)
  }

  // ---- recovery, and a new agent taking over (takeover.ts) ----------------------

  /** Both connections are back: tell the source what arrived, ask again for what is still awaited. */
  onRecover(): void {
    // the source thinks the hand-off happened, but it never arrived (lost in flight, or this receiver restarted)
    if (this.phase === DestPhase.LISTENING) throw migrationError(ErrorCode.NO_SESSION, 'this destination has no migration to recover: the hand-off never arrived here (or the receiver restarted), the service does not run here')
    const pair = this.link.pair
    if (!pair) throw migrationError(ErrorCode.PROTOCOL, 'RECOVER before both connections were back')
    const settled = this.phase === DestPhase.SETTLED // the link broke as SETTLED left: the report again, nothing else to do
    if (!settled) {
      this.hooks.milestone?.({ kind: 'back', brokenMs: this.recovery.stop(), pagesLeft: this.placement.pagesLeft })
      this.watchdog.reset()
      this.machine.transition(DestPhase.POSTCOPY)
    }
    pair.bulk.send(encodeControl(Msg.RECOVER_STATE, { ...this.recovery.state(settled ? [] : this.placement.receivedBytes()), atMs: this.clock.now() }))
    if (this.service.ports) pair.bulk.send(encodeControl(Msg.SERVICE, { ports: this.service.ports }))
    if (settled) return
    // requests that were open (their replies may be lost): blocked threads wait on them
    this.requests.askAgain()
    this.bulkPath.attach(pair.bulk, this.uffd!, this.placement)
    this.checkSettled() // every page may be here already: nothing more will arrive to settle it (a takeover after the last)
  }

  /** What an agent that takes over from this one needs, once the service runs here and the source may come back. */
  will(): AgentWill | undefined {
    return this.notes.will(this.link.sessionId, this.link.sessionPeer, this.uffd, this.recovery)
  }

  /** The last agent crashed after the hand-off: go on from its held uffd and the shared received maps, and wait for the source to dial in again. */
  takeOver(will: AgentWill, listen: string): void {
    this.applyLimits(will.limits)
    const uffd = (this.uffd = new this.binding.Uffd(will.uffd.features, will.uffd.fd, will.uffd.ioctls))
    Object.assign(this.notes, { heldFd: uffd.holdRegistrations?.(), postcopy: { nice: will.postcopyNice, forwarded: will.forwarded } })
    this.readFaults(uffd, false, true)
    Object.assign(this.recovery, { timeoutMs: will.recoveryTimeoutMs, resumedAtMs: will.resumedAtMs })
    if (will.resumedAtMs !== undefined) this.hooks.postcopy?.(will.postcopyNice, will.forwarded) // (else at resumed())
    this.link.resume(will.session, will.peer)
    this.machine.transition(DestPhase.RECOVERING)
    for (const r of this.regions) uffd.wake(r.id, 0, r.sizeBytes) // threads blocked in faults the crashed agent read fault again, into this agent's reader
    this.startRecovery(migrationError(ErrorCode.AGENT, 'the migration agent that received it crashed; a new one took over'))
    this.listen(listen).catch((err: Error) => this.fail(err)) // (its port: the source dials it again)
  }
}
