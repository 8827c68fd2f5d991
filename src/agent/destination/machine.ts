/**
 * The destination's state machine: its phases, the steps between them, and
 * the messages it accepts in each (docs/protocol.md shows both tables; a
 * unit test keeps them equal).
 */
import { Msg, decodeBatch } from '../../protocol/messages'
import type { Frame } from '../../protocol/frames'
import type { MessageTable } from '../message-table'
import type { TransitionTable } from '../state-machine'

export enum DestPhase {
  /** Listening; connections authenticate and pair up until REGIONS. */
  LISTENING = 'listening',
  /** Rounds arrive; pages go straight into the regions. A failure or cancel goes back to listening. */
  PRECOPY = 'precopy',
  /** HANDOFF applied and the service resumed here; faults become page requests. */
  POSTCOPY = 'postcopy',
  /** The link broke after the hand-off (or a new agent took over from one that crashed); faulting threads wait for the source to dial again. */
  RECOVERING = 'recovering',
  /** Every page is local. */
  SETTLED = 'settled',
  FAILED = 'failed',
}

export const DEST_TRANSITIONS: TransitionTable<DestPhase> = {
  [DestPhase.LISTENING]: [DestPhase.PRECOPY, DestPhase.RECOVERING, DestPhase.FAILED],
  [DestPhase.PRECOPY]: [DestPhase.POSTCOPY, DestPhase.LISTENING, DestPhase.FAILED],
  [DestPhase.POSTCOPY]: [DestPhase.RECOVERING, DestPhase.SETTLED, DestPhase.FAILED],
  [DestPhase.RECOVERING]: [DestPhase.POSTCOPY, DestPhase.FAILED],
  [DestPhase.SETTLED]: [],
  [DestPhase.FAILED]: [],
}

const { LISTENING, PRECOPY, POSTCOPY, RECOVERING, SETTLED, FAILED } = DestPhase
const ALL = [LISTENING, PRECOPY, POSTCOPY, RECOVERING, SETTLED, FAILED]

/** The handlers the table names (MigrationDestination implements them). */
export interface DestinationHandlers {
  onRegions(f: Frame): void
  onClock(f: Frame): void
  onPages(f: Frame): void
  onRanges(f: Frame): void
  onHandoff(f: Frame): void
  onRequestDone(f: Frame): void
  checkSettled(): void
  onRecover(): void
  onSync(): void
  onPeerError(f: Frame): never
}

/** Messages the destination accepts after a connection's handshake. */
export const DEST_MESSAGES: MessageTable<DestPhase, DestinationHandlers> = {
  [Msg.REGIONS]: { on: { bulk: [LISTENING] }, handle: (d, f) => d.onRegions(f), note: 'region table; → precopy (a preflight\'s: PREFLIGHT_OK, the session ends)' },
  [Msg.CLOCK]: { on: { urgent: [LISTENING, PRECOPY] }, handle: (d, f) => d.onClock(f), note: 'answered with the local clock' },
  [Msg.PAGES]: { on: { bulk: [PRECOPY, POSTCOPY, SETTLED], urgent: [POSTCOPY, SETTLED] }, handle: (d, f) => d.onPages(f), note: 'placed; urgent only after the hand-off; after it a page already held is ignored' },
  [Msg.RANGES]: { on: { bulk: [PRECOPY, POSTCOPY, SETTLED], urgent: [POSTCOPY, SETTLED] }, handle: (d, f) => d.onRanges(f), note: 'zero/free pages placed; urgent only after the hand-off; after it a page already held is ignored' },
  [Msg.BATCH]: { on: { bulk: [PRECOPY, POSTCOPY, SETTLED] }, handle: (_d, f) => void decodeBatch(f.payload), note: 'the bytes of the frames that follow at once (a hint for the native reader)' },
  [Msg.ROUND_END]: { on: { bulk: [PRECOPY] }, handle: () => {}, note: 'end of a round' },
  [Msg.PRECOPY_END]: { on: { bulk: [PRECOPY] }, handle: () => {}, note: 'no more rounds' },
  [Msg.HANDOFF]: { on: { bulk: [PRECOPY] }, handle: (d, f) => d.onHandoff(f), note: 'discard list applied, service restored; → postcopy' },
  [Msg.REQUEST_DONE]: { on: { urgent: [POSTCOPY, SETTLED] }, handle: (d, f) => d.onRequestDone(f), note: 'closes one page request (bulk gate)' },
  [Msg.PUSH_END]: { on: { bulk: [POSTCOPY, SETTLED] }, handle: (d) => d.checkSettled(), note: 'the source pushed everything' },
  [Msg.RECOVER]: { on: { bulk: [LISTENING, RECOVERING, SETTLED] }, handle: (d) => d.onRecover(), note: 'both connections are back: RECOVER_STATE; → postcopy (listening: ERR_MIGRATION_NO_SESSION, the hand-off never arrived)' },
  [Msg.SYNC]: { on: { bulk: [PRECOPY] }, handle: (d) => d.onSync(), note: 'answered with SYNC: everything before it on bulk is applied' },
  [Msg.KEEPALIVE]: { on: { urgent: ALL }, handle: () => {}, note: 'the source is alive (a quiet link is not a stuck peer)' },
  [Msg.ERROR]: { on: { bulk: ALL, urgent: ALL }, handle: (d, f) => d.onPeerError(f), note: 'the source gave up' },
}

