/**
 * Post-copy's bookkeeping is background work. Once the service runs on the
 * destination its clients wait on its event loop, and on a host with few
 * cores that loop waits for CPU behind the migration. From the hand-off each
 * agent's thread (the push policy on the source; placed pages, ready() waits
 * and statistics on the destination) runs at `postcopyNice` where that is
 * above the agent's own nice, so that the service's threads win the CPU when
 * both want it. It waits until the forwarded clients' route is set up: the
 * held requests wait for the destination's SERVICE message, which crosses
 * both agents' threads.
 *
 * Only the agents' threads: the native threads that move pages keep their
 * nice value. A fault on a page the push already sent waits for the bulk
 * threads, so yielding them too made the push the service's bottleneck
 * (time to settled 0.4-0.9 s -> 1.0-1.6 s, more faults in bench:postcopy A)
 * for no better latency. Measured on the 2-vCPU VM (post-copy, 256 MiB, 10k
 * writes/s, autocannon pinned to the source, HTTP path rehearsed), worst
 * client latency within downtime + 50 ms: 13 of 14 runs yielding the agents
 * only, 13 of 14 yielding the bulk threads too, 5 of 8 not yielding.
 *
 * After settling (or failing) the agent's thread goes back to its own nice
 * where the kernel lets a thread lower its nice value (root, CAP_SYS_NICE or
 * RLIMIT_NICE); elsewhere it stays at postcopyNice and the worker logs it.
 */
import { resolveIntegerSetting } from '../integer-setting'

export const DEFAULT_POSTCOPY_NICE = 10

/** postcopyNice: explicit, $UFFD_MIGRATE_POSTCOPY_NICE, or DEFAULT_POSTCOPY_NICE; an integer 0..19 (0: post-copy does not yield). */
export function resolvePostcopyNice(explicit?: number | string, name = 'options.postcopyNice'): number {
  return resolveIntegerSetting({ explicit, name, env: 'UFFD_MIGRATE_POSTCOPY_NICE', fallback: DEFAULT_POSTCOPY_NICE, min: 0, max: 19, what: 'an integer nice value from 0 to 19' })
}

/** The nice value a peer asked for in HANDOFF: an integer 0..19, anything else 0 (no yielding). */
export function peerPostcopyNice(v: unknown): number {
  return typeof v === 'number' && Number.isInteger(v) && v >= 0 && v <= 19 ? v : 0
}

export class Yielding {
  /** The nice value this thread runs at now (the agent's own until enter()). */
  private current: number
  /** An enter() that waits for clientsRouted(). */
  private deferred: (() => void) | undefined
  /** clientsRouted() came first (this migration): enterWhen() does not wait. */
  private routed = false

  /** setOwnNice: this (the agent's) thread's nice value; throws when the kernel refuses. */
  constructor(
    private readonly setOwnNice: (nice: number) => void,
    private readonly ownNice: number,
  ) {
    this.current = ownNice
  }

  /** This thread runs at `nice` from now on, if that is above the agent's own (and above where it is). */
  enter(nice: number): void {
    if (nice <= this.ownNice || nice <= this.current) return
    try {
      this.setOwnNice(nice)
      this.current = nice
    } catch {
      // raising a nice value is always allowed; nothing to undo if it was not
    }
  }

  /**
   * enter() now, or, when the service's clients are forwarded (guest.serve()), once their route is set up
   * (clientsRouted()): the held requests wait for the destination's SERVICE message, which crosses both agents'
   * threads; yielding before it had gone let them wait behind the push (measured: 5 of 8 runs within downtime + 50 ms).
   */
  enterWhen(clientsFirst: boolean, nice: number): void {
    this.deferred = undefined
    if (clientsFirst && !this.routed) this.deferred = () => this.enter(nice)
    else this.enter(nice)
  }

  /** A migration begins: nothing of an earlier one (a route, a deferred enter()) counts for it. */
  begin(): void {
    this.deferred = undefined
    this.routed = false
  }

  /** The forwarded clients' route is set up (SERVICE sent, or received and handed to the forwarder). */
  clientsRouted(): void {
    this.routed = true
    const deferred = this.deferred
    this.deferred = undefined
    deferred?.()
  }

  /** Settled (or failed): this thread back to the agent's own nice. False: the kernel refused, it stays where it is. */
  leave(): boolean {
    this.begin() // the next migration starts from nothing
    if (this.current === this.ownNice) return true
    try {
      this.setOwnNice(this.ownNice)
      this.current = this.ownNice
      return true
    } catch {
      return false
    }
  }

  /** This thread's nice value now. */
  get nice(): number {
    return this.current
  }
}
