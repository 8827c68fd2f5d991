/** Messages between the service's main thread (guest.ts) and the agent's worker. */
import type { PreflightReport } from './source/preflight'
import type { SourceOptions, Progress } from './source/index'
import type { MigrationReport } from './report'
import type { BandwidthLimits } from './source/bandwidth'

/** What crosses to the worker: no functions, the token as text; the worker adds what it resolves itself. */
/** Why a new agent takes a migration over: the old one's phase and error; when the migration began and the service stopped (main thread's clock). */
export interface TakeoverCause {
  phase: string
  message: string
  startedAtMs: number
  stoppedAtMs?: number
}

export type WireSourceOptions = Omit<SourceOptions, 'token' | 'bulkBufferBytes' | 'pushUnsentBytes' | 'dial' | 'clock'> & { token: string }

export type MainToAgent =
  | { type: 'migrate'; options: WireSourceOptions }
  /** Would a migration with these options start now? Nothing moves (src/agent/source/preflight.ts). */
  | { type: 'preflight'; options: WireSourceOptions }
  /** A new agent takes over the migration whose agent crashed with the service paused (MigrationSource.takeOver()). */
  | { type: 'takeOver'; options: WireSourceOptions; crash: TakeoverCause }
  /** stoppedAtMs / postedAtMs: when the main thread began pause() / posted its encoded state (nowMs(), monotonic: the same clock in every thread). */
  | { type: 'paused'; state: Uint8Array; stoppedAtMs: number; postedAtMs?: number }
  | { type: 'pauseFailed'; error: { code: string; message: string } }
  /** filled: the service's thread already zero-filled the range through the agent's userfaultfd (GuestRegion.free). */
  | { type: 'free'; region: number; firstPage: number; pageCount: number; filled?: boolean }
  | { type: 'resumed'; atMs: number }
  | { type: 'willNeed'; region: number; firstPage: number; pageCount: number }
  | { type: 'restoreFailed'; error: { code: string; message: string } }
  | { type: 'cancel' }
  /** The running migration's bandwidth limits change (checked on the main thread). */
  | { type: 'setBandwidth'; limits: Partial<BandwidthLimits> }
  /** receive mode: the answer to 'rehearse': the HTTP path ran once on the service's thread (src/forward-rehearsal.ts) */
  | { type: 'rehearsed' }
  /** receive mode: the service listens on these ports (guest.serve(), per served server). */
  | { type: 'serving'; ports: (number | null)[] }
  /** ready() waits, four numbers each: id, region, first page, page count (src/wait-batch.ts) */
  | { type: 'wait'; waits: number[] }
  /** receive mode: the service's thread took the 'failed' of a migration that failed after the hand-off (it is not blocked in a fault) */

export type AgentToMain =
  | { type: 'pause' }
  /** The answers to 'preflight', in order. */
  | { type: 'preflightDone'; report: PreflightReport }
  | { type: 'preflightFailed'; error: { code: string; message: string } }
  | { type: 'resume' }
  | { type: 'progress'; progress: Progress }
  | { type: 'report'; report: MigrationReport }
  /** afterHandoff: the source's migration failed once the service ran on the destination. */
  /** runsOn 'unknown': nobody here can tell whether the service runs on the destination (a second agent crash with it paused, or HANDOFF never confirmed). */
  | { type: 'failed'; error: { code: string; message: string; afterHandoff?: boolean; runsOn?: 'unknown' } }
  /** receive mode: a session ended before the hand-off; the guest waits for the next source. */
  | { type: 'sessionEnded' }
  /** receive mode: a source's session began (its region table matched): pre-copy from `peer`; migration: its id. */
  | { type: 'incoming'; peer: string; migration: string }
  /** receive mode: a migration of a service serving HTTP began: the main thread rehearses that path, then answers 'rehearsed'. */
  | { type: 'rehearse' }
  /** receive mode: a connection was refused (the agent logged the line); refusals: counts by code so far. */
  | { type: 'refused'; message: string; refusals: Record<string, number> }
  /** The destination's service listens on these ports of host: forward clients there. */
  | { type: 'forwardTo'; host: string; ports: (number | null)[] }
  | { type: 'listening'; port: number; atMs: number }
  /** standby: a will is armed (the source may come back: pages still to come, or only the settlement): start a standby agent once the service runs. */
  | { type: 'restore'; state: Uint8Array; standby: boolean }
  | { type: 'ready'; ids: number[] }
  | { type: 'settled' }
  | { type: 'recovering'; message: string }
  /** The source came back after a break: post-copy goes on (status: settling again). */
  | { type: 'linkBack' }
  /** cancel() was not taken (nothing runs, or the hand-off is done): why. */
  | { type: 'cancelRefused'; error: { code: string; message: string } }
  /** The limits that hold now (answer to setBandwidth), or why none changed. */
  | { type: 'bandwidthSet'; limits: BandwidthLimits }
  | { type: 'bandwidthRefused'; error: { code: string; message: string } }

/**
 * A message carrying the hand-off state ('paused', 'restore'), with the postMessage transfer list that moves it: the
 * state is copied once into an ArrayBuffer of its own. A view would be cloned with its whole buffer (msgpackr's 1 MiB
 * working buffer, a frame's) into fresh memory that this VM backs page by page: 3.5 ms in the pause window for a
 * 256 KiB state, against ~1 ms for this copy and a transfer that copies nothing. Always a copy: the view's own
 * buffer may be reused by its owner (msgpackr packs the next state into it).
 */
export function withOwnState<M extends { state: Uint8Array }>(m: M): [M, ArrayBuffer[]] {
  const state = new Uint8Array(m.state)
  return [{ ...m, state }, [state.buffer]]
}
