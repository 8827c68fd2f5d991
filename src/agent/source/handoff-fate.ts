/**
 * The hand-off's fate: where the service runs as far as the source knows (HandoffFate, every rule that depends on it
 * reads it), what a failure says about it (sayWhereItRuns), taking it back after a lost destination (reclaimAfterLoss),
 * and asking the destination again, on a new link, what it holds: RECOVER, answered with RECOVER_STATE (it runs the
 * service) or ERR_MIGRATION_NO_SESSION (it never took the hand-off). One loop for both askers:
 * - post-copy recovery after a broken link, and a new agent's takeover (postcopy.ts's dialBack);
 * - the source's own failure between HANDOFF and RESUMED (a bug; nothing the link or the destination said),
 *   askFate() below. Ending there, as before, told the destination ERROR on urgent, which (or urgent's end)
 *   could reach it before HANDOFF on bulk: it ended its session in pre-copy while this side, committed, kept the
 *   service paused, and the service ran nowhere. So this side tells nothing on the old link and asks on a new one.
 *   RECOVER_STATE: it runs the service, which cannot get its pages now; it hears why here, and fails at once.
 *   NO_SESSION: the service resumes here. No answer in time: it may run there, so the source keeps its memory.
 */
import { ErrorCode, type UffdMigrateError } from '../../errors'
import { type Clock, sleep } from '../clock'
import { StateMachine, type TransitionTable } from '../state-machine'
import { askRecoverState, type SourceLink } from './link'

/** Where the service runs, as far as the source knows: its second state machine, beside the phases (machine.ts). */
export enum Fate {
  /** HANDOFF is not on the wire: the service runs here, or is paused here and resumes here on a failure. */
  HERE = 'here',
  /** HANDOFF is on the wire and the destination has not said whether it took it: the service may run there. */
  UNKNOWN = 'unknown',
  /** The destination said it runs the service: RESUMED, or a recovery's answer. */
  THERE = 'there',
  /** The destination said the service does not run there (NO_SESSION, or it could not restore HANDOFF): it resumes here. */
  BACK = 'back',
  /** The destination was lost and the operator asked for the service back (onDestinationLost 'resume'): it resumes here. */
  RECLAIMED = 'reclaimed',
}

export const FATE_TRANSITIONS: TransitionTable<Fate> = {
  // unknown from the start: a new agent taking over a migration whose agent crashed with the service paused
  [Fate.HERE]: [Fate.UNKNOWN],
  [Fate.UNKNOWN]: [Fate.THERE, Fate.BACK, Fate.RECLAIMED],
  // NO_SESSION after RESUMED: the receiver restarted, and the service it ran ended with it
  [Fate.THERE]: [Fate.BACK, Fate.RECLAIMED],
  [Fate.BACK]: [],
  [Fate.RECLAIMED]: [],
}

/**
 * The hand-off's fate, asked in one place by every rule that depends on it: whether a broken link or a malformed
 * frame is recovered (Postcopy.recoverable) and told to the destination (Channel.tellsRefusal), whether a failure of
 * this side's own asks the destination first (needsAsking), whether the service resumes here (runsHere) or the source
 * keeps its memory (mayRunThere), whether a cancel is refused.
 */
export class HandoffFate {
  private readonly machine = new StateMachine('source hand-off', FATE_TRANSITIONS, Fate.HERE)
  /** A redial window ran out without an answer: asking again would only repeat it. */
  private unanswered = false

  get state(): Fate { return this.machine.phase }

  is(...states: Fate[]): boolean { return this.machine.is(...states) }

  /** HANDOFF is on the wire (or a new agent takes over a migration whose HANDOFF may be). */
  handedOff(): void { this.machine.transition(Fate.UNKNOWN) }

  /** The destination said it runs the service. */
  arrived(): void {
    if (this.is(Fate.UNKNOWN)) this.machine.transition(Fate.THERE)
  }

  /**
   * The destination's ERROR says the service did not start there (it could not restore HANDOFF, or gave up before
   * the hand-off took effect). Once it said it runs the service, such an ERROR contradicts it: the service may run
   * there, and resuming it here too would run it twice; the source keeps its memory instead.
   */
  refused(): void {
    if (this.is(Fate.UNKNOWN)) this.machine.transition(Fate.BACK)
  }

  /** The destination answered a recovery with NO_SESSION: it holds no session of this migration. */
  lost(): void {
    if (this.is(Fate.UNKNOWN, Fate.THERE)) this.machine.transition(Fate.BACK)
  }

  /**
   * The destination is lost (it failed, or stayed unreachable past the recovery window) and the operator asked for the
   * service back (onDestinationLost 'resume'): it resumes here, with its state as of the hand-off.
   */
  reclaim(): void {
    if (this.mayRunThere) this.machine.transition(Fate.RECLAIMED)
  }

  /** Asking ran for a whole redial window without an answer. */
  askedInVain(): void { this.unanswered = true }

  /** The service may run on the destination: the source keeps its memory (its pages' only copy) and refuses a cancel. */
  get mayRunThere(): boolean { return this.is(Fate.UNKNOWN, Fate.THERE) }

  /** On a failure the service resumes here. */
  get runsHere(): boolean { return this.is(Fate.HERE, Fate.BACK, Fate.RECLAIMED) }

  /** In the words of `send --json` and `status`: where the service runs now, as far as this side knows. */
  get serviceRunsOn(): 'source' | 'destination' | 'unknown' {
    return this.runsHere ? 'source' : this.is(Fate.THERE) ? 'destination' : 'unknown'
  }

  /** A failure of this side's own, before the destination said anything: ask it (askFate) before deciding. */
  get needsAsking(): boolean { return this.is(Fate.UNKNOWN) && !this.unanswered }
}

/**
 * A failure of one redial that another may not meet: the link's (a reset, a refused connect), a deadline of the new
 * connection's (its handshake, the slot's), an answer that is not one (a protocol error the destination did not
 * report), or a handshake that fails (another version, a proof that does not check out: this destination passed the
 * handshake before, so a byte changed on the path, or another process answers at its address for now; giving up on
 * the first lost the service there, found by the source-side fuzzer). The destination's own refusal (it failed,
 * another session holds it) ends the asking.
 */
export function redialMayHelp(err: Error): boolean {
  const { code, fromPeer } = err as UffdMigrateError
  if (code === ErrorCode.VERSION || code === ErrorCode.AUTH) return true
  return code === ErrorCode.CONNECTION || code === ErrorCode.CONNECT || code === ErrorCode.TIMEOUT || (code === ErrorCode.PROTOCOL && !fromPeer)
}

export interface Redial {
  open: () => Promise<SourceLink>
  clock: Clock
  /** The deadline of each answer. */
  linkTimeoutMs: number
  /** How long to go on dialling. */
  forMs: number
  /** Why it asks (thrown if no try fit in forMs). */
  cause: Error
}

/**
 * Dials and asks RECOVER_STATE until an answer that `answered` takes (what it throws fails that try; the link is its
 * own once it returns), backing off 25, 50, 100 ... 1000 ms between tries: a destination agent's standby listens again
 * ~100 ms after a crash (bench:takeover). Throws the destination's NO_SESSION or refusal, or the last try's failure
 * once forMs ran out.
 */
export async function askAgain<T>(o: Redial, answered: (link: SourceLink, state: Record<string, unknown>, askedAtMs: number) => T): Promise<T> {
  const until = o.clock.now() + o.forMs
  let last = o.cause
  for (let attempt = 0; o.clock.now() < until; attempt++) {
    if (attempt > 0) await sleep(o.clock, Math.min(1000, 25 * 2 ** (attempt - 1)))
    let link: SourceLink | undefined
    try {
      link = await o.open()
      const { state, askedAtMs } = await askRecoverState(link.bulk, o.linkTimeoutMs, o.clock) // (past it: dialled again)
      return answered(link, state, askedAtMs)
    } catch (err) {
      last = err as Error
      link?.close()
      // (giving up on a malformed answer, or a deadline of the new connection's, left a service whose hand-off never
      // arrived paused here while it ran nowhere, its NO_SESSION never heard: found by the source-side fuzzer)
      if ((err as UffdMigrateError).code === ErrorCode.NO_SESSION || !redialMayHelp(err as Error)) throw err
    }
  }
  throw last
}

/**
 * A failed migration's error says where the service runs now (the caller resumed it here when the fate is back). Past
 * the hand-off, unless it came back, the destination may run it: the source's copy is the only backing store of the
 * pages it lacks, and is kept (afterHandoff); unknown: the destination never said whether it took HANDOFF, and asking
 * ran out, so its operator's `status` says.
 */
export function sayWhereItRuns(err: Error, fate: HandoffFate): void {
  if (fate.is(Fate.RECLAIMED)) {
    err.message += ' (the destination was lost after the hand-off: the service resumed on the source with its state as of the hand-off, onDestinationLost resume; what it did there since is lost)'
  } else if (fate.is(Fate.BACK)) err.message += ' (the service resumed on the source)'
  else if (fate.mayRunThere) {
    const unconfirmed = fate.serviceRunsOn === 'unknown'
    err.message += ` (after the hand-off${unconfirmed ? ', which the destination never confirmed: the service may run there' : ''}: the source keeps its memory until the destination settles)`
    Object.assign(err, { afterHandoff: true }, unconfirmed ? { runsOn: 'unknown' } : {})
  }
}

/** How long past the destination's own recovery window (linkTimeoutMs after this side's, at most) the source waits. */
export const RECLAIM_MARGIN_MS = 1000

/**
 * onDestinationLost 'resume': the migration failed after the hand-off, and the service may still run there. Once the
 * destination has surely given it up, the fate is reclaimed, and the caller resumes the service here. A destination
 * that said it failed ended its service at once; else its own recovery window, as long as this side's, began when it
 * noticed the break, at most linkTimeoutMs after this side did, and its service ends with it.
 */
export async function reclaimAfterLoss(fate: HandoffFate, err: Error, linkTimeoutMs: number, clock: Clock): Promise<void> {
  if (!fate.mayRunThere) return
  if (!(err as UffdMigrateError).fromPeer) await sleep(clock, linkTimeoutMs + RECLAIM_MARGIN_MS)
  fate.reclaim()
}

/** Asks for up to forMs whether the destination took the hand-off, and records its answer (or none) in fate. */
export async function askFate(o: Redial, fate: HandoffFate): Promise<void> {
  try {
    await askAgain(o, (link) => {
      link.tell(o.cause) // it runs the service, which cannot get its pages now: it fails at once, not after its window
      link.close()
    })
    fate.arrived()
  } catch (err) {
    if ((err as UffdMigrateError).code === ErrorCode.NO_SESSION) fate.lost()
    else fate.askedInVain()
  }
}
