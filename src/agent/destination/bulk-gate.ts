/**
 * When the destination reads the bulk channel. A page request's reply comes
 * on the urgent channel; it must not wait behind megabytes of push that this
 * event loop reads from a busy bulk socket in one go. Two rules:
 * - fault rule: while a FAULT request is open (a thread is blocked), bulk is
 *   read one frame per turn of the loop (afterFrame() pauses reading until
 *   the next turn): the reply waits behind one frame at most, and the push
 *   keeps flowing (a full stop per fault cost most of the push on a fast link);
 * - ready rule: while a READY request is open (ready() awaits, nobody is
 *   blocked), bulk reading stops for at most READY_PAUSE_MS, then runs for as
 *   long: a service that asks all the time must not starve the push.
 * REQUEST_DONE (after the replies, on the urgent channel) closes a request.
 */
import { ErrorCode, migrationError } from '../../errors'
import { RequestKind } from '../../protocol/messages'
import type { Clock, TimerHandle } from '../clock'

/** Longest stretch ready() requests may hold the push back (then it runs as long). */
export const READY_PAUSE_MS = 5

export class BulkGate {
  /** Open PAGE_REQUESTs by kind (READY, FAULT). */
  private readonly open = [0, 0]
  private readyPausedSince = 0
  private readyHoldoffUntil = 0
  private readyTimer: TimerHandle | undefined
  /** Reading paused until the next turn of the loop (fault rule). */
  private yielding = false
  private paused = false

  constructor(
    private readonly clock: Clock,
    /** Pauses or resumes reading the bulk channel (Channel.pauseReading/resumeReading). */
    private readonly setPaused: (paused: boolean) => void,
  ) {}

  get isPaused(): boolean {
    return this.paused
  }

  openRequests(kind: RequestKind): number {
    return this.open[kind]
  }

  opened(kind: RequestKind): void {
    this.open[kind]++
    this.update()
  }

  done(kind: RequestKind): void {
    if (this.open[kind] === 0) throw migrationError(ErrorCode.PROTOCOL, 'REQUEST_DONE without an open request')
    this.open[kind]--
    this.update()
  }

  /** A bulk frame was handled (post-copy): the fault rule yields until the next turn. */
  afterFrame(): void {
    if (this.yielding || this.open[RequestKind.FAULT] === 0) return
    this.yielding = true
    this.update()
    this.clock.setImmediate(() => {
      this.yielding = false
      this.update()
    })
  }

  /** The link broke: no request is open any more (they are asked again on the next link). */
  reset(): void {
    this.open[0] = this.open[1] = 0
    if (this.readyTimer !== undefined) this.clock.clearTimeout(this.readyTimer)
    this.readyTimer = undefined
    this.readyPausedSince = 0
    this.readyHoldoffUntil = 0
    this.paused = false
  }

  private update(): void {
    const now = this.clock.now()
    let pause = this.yielding
    if (!pause && this.open[RequestKind.READY] > 0 && now >= this.readyHoldoffUntil) {
      if (this.readyPausedSince === 0) this.readyPausedSince = now
      if (now - this.readyPausedSince < READY_PAUSE_MS) {
        pause = true
        this.readyTimer ??= this.clock.setTimeout(() => {
          this.readyTimer = undefined
          this.update()
        }, READY_PAUSE_MS)
      } else {
        this.readyHoldoffUntil = now + READY_PAUSE_MS
        this.readyPausedSince = 0
      }
    }
    if (!pause || this.open[RequestKind.READY] === 0) this.readyPausedSince = 0
    if (pause !== this.paused) {
      this.paused = pause
      this.setPaused(pause)
    }
  }
}
