/**
 * Asking the destination again, on a new link, what it holds: RECOVER, answered with RECOVER_STATE (it runs the
 * service) or ERR_MIGRATION_NO_SESSION (it never took the hand-off). One loop for both askers:
 * - post-copy recovery after a broken link, and a new agent's takeover (postcopy.ts's dialBack);
 * - the source's own failure between HANDOFF and RESUMED (a bug; nothing the link or the destination said),
 *   handoffArrived() below. Ending there, as before, told the destination ERROR on urgent, which (or urgent's end)
 *   could reach it before HANDOFF on bulk: it ended its session in pre-copy while this side, committed, kept the
 *   service paused, and the service ran nowhere. So this side tells nothing on the old link and asks on a new one.
 *   RECOVER_STATE: it runs the service, which cannot get its pages now; it hears why here, and fails at once.
 *   NO_SESSION: the service resumes here. No answer in time: it may run there, so the source keeps its memory.
 */
import { ErrorCode, type UffdMigrateError } from '../../errors'
import { type Clock, sleep } from '../clock'
import { askRecoverState, type SourceLink } from './link'

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

/** True unless the destination said it never took the hand-off (NO_SESSION); asks for up to forMs. */
export async function handoffArrived(o: Redial): Promise<boolean> {
  try {
    return await askAgain(o, (link) => {
      link.tell(o.cause) // it runs the service, which cannot get its pages now: it fails at once, not after its window
      link.close()
      return true
    })
  } catch (err) {
    return (err as UffdMigrateError).code !== ErrorCode.NO_SESSION
  }
}
