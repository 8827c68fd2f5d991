/**
 * Which message is legal where (ssh2's MESSAGE_HANDLERS style): each side
 * keeps a table keyed by message type that names the channel and the phases
 * in which the message is accepted. route() is the only legality check; a
 * message outside its phases or channel is ERR_MIGRATION_PROTOCOL.
 */
import { ErrorCode, migrationError } from '../errors'
import type { Frame } from '../protocol/frames'
import { MSG_NAMES } from '../protocol/messages'

export type ChannelName = 'urgent' | 'bulk'

export interface MessageRule<P extends string, Ctx> {
  /** Per channel, the phases in which the message is legal there. */
  on: Partial<Record<ChannelName, readonly P[]>>
  /** Absent for replies awaited inline (the handshake-like exchanges of connect and recovery). */
  handle?: (ctx: Ctx, f: Frame) => void
  /** One line for docs/protocol.md. */
  note: string
}

export type MessageTable<P extends string, Ctx> = Readonly<Partial<Record<number, MessageRule<P, Ctx>>>>

export function msgName(type: number): string {
  return MSG_NAMES[type] ?? `type ${type}`
}

/** The rule for a frame, or ERR_MIGRATION_PROTOCOL naming why it is not legal here. */
export function route<P extends string, Ctx>(table: MessageTable<P, Ctx>, side: string, phase: P, channel: ChannelName, type: number): MessageRule<P, Ctx> {
  const rule = table[type]
  if (!rule) throw migrationError(ErrorCode.PROTOCOL, `the ${side} never accepts message ${msgName(type)}`)
  const phases = rule.on[channel]
  if (!phases) throw migrationError(ErrorCode.PROTOCOL, `message ${msgName(type)} is not legal on the ${channel} channel`)
  if (!phases.includes(phase)) throw migrationError(ErrorCode.PROTOCOL, `message ${msgName(type)} is not legal in phase ${phase}`)
  return rule
}
