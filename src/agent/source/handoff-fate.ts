/**
 * Whether the hand-off took effect at the destination, when this side cannot tell: after a failure of its own
 * between HANDOFF and RESUMED (a bug; nothing the link or the destination said). Ending there, as before, told the
 * destination ERROR on urgent, which (or urgent's end) could reach it before HANDOFF on bulk: it ended its session
 * in pre-copy while this side, committed, kept the service paused, and the service ran nowhere. So this side tells
 * nothing on the old link and asks on a new one, as a recovery does: RECOVER_STATE (it runs the service: it hears why
 * this side gives up, and fails at once) or ERR_MIGRATION_NO_SESSION (it never took the hand-off: the service
 * resumes here). No answer in time: it may run there, so the source keeps its memory, as before.
 */
import { ErrorCode, type UffdMigrateError } from '../../errors'
import { type Clock, sleep } from '../clock'
import { askRecoverState, type SourceLink } from './link'

/**
 * A failure of one redial that another may not meet: the link's (a reset, a refused connect), a deadline of the new
 * connection's (its handshake, the slot's), or an answer that is not one (a protocol error the destination did not
 * report). The destination's own refusal (it failed, another session holds it) ends the asking.
 */
export function redialMayHelp(err: Error): boolean {
  const { code, fromPeer } = err as UffdMigrateError
  return code === ErrorCode.CONNECTION || code === ErrorCode.CONNECT || code === ErrorCode.TIMEOUT || (code === ErrorCode.PROTOCOL && !fromPeer)
}

/** True unless the destination said it never took the hand-off (NO_SESSION); asks for up to askForMs. */
export async function handoffArrived(cause: Error, o: { open: () => Promise<SourceLink>; clock: Clock; linkTimeoutMs: number; askForMs: number }): Promise<boolean> {
  const until = o.clock.now() + o.askForMs
  for (let attempt = 0; o.clock.now() < until; attempt++) {
    if (attempt > 0) await sleep(o.clock, Math.min(1000, 25 * 2 ** (attempt - 1)))
    let link: SourceLink | undefined
    try {
      link = await o.open()
      await askRecoverState(link.bulk, o.linkTimeoutMs, o.clock)
      link.tell(cause) // it runs the service, which cannot get its pages now: it fails at once, not after its window
      return true
    } catch (err) {
      if ((err as UffdMigrateError).code === ErrorCode.NO_SESSION) return false
      if (!redialMayHelp(err as Error)) return true
    } finally {
      link?.close()
    }
  }
  return true
}
