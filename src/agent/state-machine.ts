/**
 * One state machine per side: a phase, a transition table, and one
 * transition() that refuses a step the table does not list. A refused step is
 * a bug in the engine (the message tables keep the peer from asking for one),
 * so it is ERR_AGENT, not a protocol error.
 */
import { ErrorCode, migrationError } from '../errors'

export type TransitionTable<P extends string> = Readonly<Record<P, readonly P[]>>

export class StateMachine<P extends string> {
  private current: P

  constructor(
    readonly side: string,
    readonly table: TransitionTable<P>,
    initial: P,
    private readonly onChange?: (from: P, to: P) => void,
  ) {
    this.current = initial
  }

  get phase(): P {
    return this.current
  }

  is(...phases: P[]): boolean {
    return phases.includes(this.current)
  }

  canTransition(to: P): boolean {
    return this.table[this.current].includes(to)
  }

  transition(to: P): void {
    if (!this.canTransition(to)) {
      throw migrationError(ErrorCode.AGENT, `${this.side}: no transition from ${this.current} to ${to} (legal: ${this.table[this.current].join(', ') || 'none'})`)
    }
    const from = this.current
    this.current = to
    this.onChange?.(from, to)
  }
}
