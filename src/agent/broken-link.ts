/**
 * Which failures after the hand-off are a broken link that post-copy recovery takes, on both sides. A reset, a
 * timeout, a record that fails its tag: always. A frame that breaks the protocol (not the peer's own ERROR): a few
 * times per migration. Ending there lost the service: it runs at the destination on pages only the source holds. The
 * cause is a byte TCP's checksum missed (a plaintext link; a sealed one refuses it as a failed tag already), or a bug
 * of the peer's: a peer that repeats it ends the migration at the budget, as before. As QEMU, whose destination pauses
 * for recovery on any load error once its guest runs on it. Nothing of such a frame is placed: its pages go again.
 */
import { ErrorCode, migrationError, type UffdMigrateError } from '../errors'
import { isIntegrityFailure } from '../protocol/records'

/** Frames that broke the protocol after the hand-off that each side recovers from, per migration; the next one ends it. */
export const PROTOCOL_BREAKS_RECOVERED = 3

/** err ends the link, not the migration, given how many protocol breaks this side recovered from so far. */
export function breaksLinkOnly(err: Error, protocolBreaks: number): boolean {
  const { code, fromPeer } = err as UffdMigrateError
  return code === ErrorCode.CONNECTION || (code === ErrorCode.PROTOCOL && !fromPeer && protocolBreaks < PROTOCOL_BREAKS_RECOVERED)
}

/** A protocol break (it counts toward the budget), not a plain broken link. */
export function isProtocolBreak(err: Error): boolean {
  return (err as UffdMigrateError).code === ErrorCode.PROTOCOL
}

/** The operator's words for why the link went: a malformed frame says so, a broken link says its own cause. */
export function brokenLinkCause(err: Error, protocolBreaks: number): string {
  return isProtocolBreak(err) ? `a frame that broke the protocol, ${protocolBreaks} of ${PROTOCOL_BREAKS_RECOVERED} recovered from: ${err.message}` : err.message
}

/**
 * What this side found, as against the link's own end (a reset, a stall) or the peer's report: a frame or stream it
 * refused, a record that failed its tag, pages it could not place, a region table or memory check that failed, a
 * stuck peer (stuckPeerError). Told to the peer when it ends the session or the migration.
 */
export function isFinding(err: Error): boolean {
  const { code, fromPeer } = err as UffdMigrateError
  return !fromPeer && (code !== ErrorCode.CONNECTION || isIntegrityFailure(err) || (err as { stuckPeer?: boolean }).stuckPeer === true)
}

/** A peer this side's watchdog found stuck: a broken link like a reset (CONNECTION), but one this side found (isFinding). */
export function stuckPeerError(message: string): UffdMigrateError {
  return Object.assign(migrationError(ErrorCode.CONNECTION, message), { stuckPeer: true })
}
