/** What the destination is given: its options and the hooks by which it reaches the service (through the worker). */
import type { Headroom } from '../../memory-headroom'
import type { Clock } from '../clock'
import type { AcceptorLimits } from './accept'

export interface DestinationOptions {
  token: Buffer
  /** Kernel socket buffers of the bulk connection (0: leave alone). */
  bulkBufferBytes: number
  clock?: Clock
  /** Handshake deadline and the cap on unauthenticated connections (defaults: 5 s, 16). */
  limits?: Partial<AcceptorLimits>
  /** Insist on sealed connections (AES-256-GCM, src/protocol/records.ts), whatever the source asks. */
  encrypt?: boolean
  /** What this process can still allocate (src/memory-headroom.ts), checked against the source's resident size at REGIONS; absent: no check. */
  memoryHeadroom?: () => Headroom | undefined
}

/** The turns of an incoming migration the operator's log tells (peer: the source's address; its start is `incoming`). */
export type DestMilestone =
  | { kind: 'began'; peer: string; migration?: string; encrypted?: boolean }
  | { kind: 'resumed'; peer: string; afterHandoffMs: number | undefined; pagesLeft: number }
  | { kind: 'back'; brokenMs: number; pagesLeft: number }
  | { kind: 'settled'; afterResumeMs: number; networkFaults: number; p99Us: number; recoveries?: number; protocolBreaks?: number }
  /** A preflight passed here (send --dry-run): nothing moved. */
  | { kind: 'preflight'; peer: string; migration: string; residentBytes: number | undefined; room: Headroom | undefined }

export interface DestinationHooks {
  /** The hand-off arrived: resume the service with this state. Resolves when it runs; rejects when the state cannot be restored. */
  restore(state: Uint8Array): Promise<number>
  /** Every page is local. */
  settled(): void
  /** These ready() waits of the service are satisfied: their ranges are local. */
  ready(waitIds: number[]): void
  failed(err: Error): void
  /** The connection broke during post-copy; the source has recoveryTimeoutMs to come back. */
  recovering?(message: string): void
  /** A connection was refused before it joined a migration (one line: peer and reason); refusals: counts by code so far. */
  refused?(message: string, refusals: Record<string, number>): void
  /** A turn of the session, for the operator's log (src/agent/log-lines.ts). */
  milestone?(m: DestMilestone): void
  /** A session ended before the hand-off (id: its migration id; preflight: it asked only that), the guest listens for the next source. */
  sessionEnded?(err: Error, session: { id: string | undefined; preflight: boolean }): void
  /**
   * A migration began (its region table matched); peer: the source's address; servesHttp: the source's service serves
   * HTTP; session: the migration's id (its source chose it; both hosts log it). A promise: the service's thread prepares (src/forward-rehearsal.ts), REGIONS_OK waits for it (not the pause window).
   */
  incoming?(o: { peer: string; servesHttp: boolean; session: string; encrypted: boolean }): Promise<void> | undefined
  /** A preflight passed every check (REGIONS, memory) and was answered; the session ended, nothing moved. */
  preflight?(o: { peer: string; session: string; residentBytes: number | undefined; room: Headroom | undefined }): void
  /** The service runs here: the agent's thread yields from now on, at this nice value (src/agent/yielding.ts); forwarded: the source forwards the service's clients here. */
  postcopy?(nice: number, forwarded: boolean): void
  /** Takes the service's pending calls now (between pushed frames), instead of after the loop's turn. */
  pollService?(): void
}
