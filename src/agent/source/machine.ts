/**
 * The source's state machine: its phases, the steps between them, and the
 * messages it accepts in each (docs/protocol.md shows both tables; a unit
 * test keeps them equal). Replies the source awaits inline (REGIONS_OK,
 * CLOCK, RECOVER_STATE) are listed without a handler.
 */
import { Msg } from '../../protocol/messages'
import type { MessageTable } from '../message-table'
import type { TransitionTable } from '../state-machine'
import type { Frame } from '../../protocol/frames'

export enum SourcePhase {
  /** Dialling and authenticating both connections, region table, clock samples. */
  CONNECT = 'connect',
  /** Rounds while the service runs (post-copy mode: the zero-page round only). */
  PRECOPY = 'precopy',
  /** The service is pausing here; final scan; HANDOFF not sent yet (a failure resumes it here). */
  HANDOFF = 'handoff',
  /** HANDOFF is on the wire: the service runs on the destination; requests answered, the rest pushed. */
  POSTCOPY = 'postcopy',
  /** The link broke after the hand-off: dialling the destination again. */
  RECOVERING = 'recovering',
  /** The destination has every page. */
  SETTLED = 'settled',
  FAILED = 'failed',
}

export const SOURCE_TRANSITIONS: TransitionTable<SourcePhase> = {
  // recovering: a new agent takes over a migration whose agent crashed with the service paused (takeOver())
  [SourcePhase.CONNECT]: [SourcePhase.PRECOPY, SourcePhase.RECOVERING, SourcePhase.FAILED],
  [SourcePhase.PRECOPY]: [SourcePhase.HANDOFF, SourcePhase.FAILED],
  [SourcePhase.HANDOFF]: [SourcePhase.POSTCOPY, SourcePhase.FAILED],
  [SourcePhase.POSTCOPY]: [SourcePhase.RECOVERING, SourcePhase.SETTLED, SourcePhase.FAILED],
  [SourcePhase.RECOVERING]: [SourcePhase.POSTCOPY, SourcePhase.SETTLED, SourcePhase.FAILED],
  [SourcePhase.SETTLED]: [],
  [SourcePhase.FAILED]: [],
}

const { CONNECT, PRECOPY, HANDOFF, POSTCOPY, RECOVERING, SETTLED, FAILED } = SourcePhase
const ALL = [CONNECT, PRECOPY, HANDOFF, POSTCOPY, RECOVERING, SETTLED, FAILED]

/** The handlers the table names (Postcopy has the post-copy ones; MigrationSource implements these). */
export interface SourceHandlers {
  readonly postcopy: {
    onPageRequest(f: Frame): void
    onWillNeed(f: Frame): void
    onResumed(f: Frame): void
    onFreed(f: Frame): void
    onSettled(f: Frame): void
  }
  onService(f: Frame): void
  onPeerError(f: Frame): never
}

/** Messages the source accepts after a connection's handshake. */
export const SOURCE_MESSAGES: MessageTable<SourcePhase, SourceHandlers> = {
  [Msg.REGIONS_OK]: { on: { bulk: [CONNECT] }, note: 'awaited reply to REGIONS' },
  [Msg.PREFLIGHT_OK]: { on: { bulk: [CONNECT] }, note: 'awaited reply to a preflight\'s REGIONS (preflight.ts): nothing moves' },
  [Msg.CLOCK]: { on: { urgent: [CONNECT] }, note: 'awaited reply: a clock sample' },
  [Msg.SYNC]: { on: { bulk: [PRECOPY] }, note: 'awaited reply: the destination applied what came before' },
  [Msg.RECOVER_STATE]: { on: { bulk: [RECOVERING] }, note: 'awaited reply to RECOVER; → postcopy' },
  [Msg.PAGE_REQUEST]: { on: { urgent: [POSTCOPY] }, handle: (s, f) => s.postcopy.onPageRequest(f), note: 'pending pages of the runs go on urgent, then REQUEST_DONE' },
  [Msg.WILL_NEED]: { on: { urgent: [POSTCOPY] }, handle: (s, f) => s.postcopy.onWillNeed(f), note: 'steers the push policy' },
  [Msg.RESUMED]: { on: { bulk: [POSTCOPY] }, handle: (s, f) => s.postcopy.onResumed(f), note: 'the service runs on the destination (downtime ends)' },
  [Msg.FREED]: { on: { bulk: [POSTCOPY] }, handle: (s, f) => s.postcopy.onFreed(f), note: 'never push these pages' },
  [Msg.SETTLED]: { on: { bulk: [POSTCOPY] }, handle: (s, f) => s.postcopy.onSettled(f), note: 'the destination has every page: its report; → settled' },
  [Msg.SERVICE]: { on: { bulk: [POSTCOPY, SETTLED] }, handle: (s, f) => s.onService(f), note: 'the destination service\'s ports: the forwarder relays clients there' },
  [Msg.KEEPALIVE]: { on: { urgent: ALL }, handle: () => {}, note: 'the destination is alive (a quiet link is a stuck destination)' },
  [Msg.ERROR]: { on: { bulk: ALL, urgent: ALL }, handle: (s, f) => s.onPeerError(f), note: 'the destination gave up' },
}
