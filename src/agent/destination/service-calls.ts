/**
 * The service's calls on the destination's agent while its memory arrives (ready(), willNeed(), serve(), free()),
 * each as the destination's phase allows it. They come through the worker's messages (src/agent/worker.ts).
 */
import type { Channel } from '../../protocol/channel'
import { encodeControl, Msg } from '../../protocol/messages'
import { DestPhase } from './machine'
import type { Requests } from './requests'

/** The destination as these calls see it (its session's state changes under them: read at each call). */
export interface ServiceCallsHost {
  readonly phase: DestPhase
  readonly requests: Requests
  readonly urgent: Channel | undefined
  readonly bulk: Channel | undefined
  readonly hasUffd: boolean
  ready(ids: number[]): void
}

export class ServiceCalls {
  /** guest.serve() ports, sent again to a source that came back after a break. */
  ports: (number | null)[] | undefined

  constructor(private readonly d: ServiceCallsHost) {}

  /** ready(): answered once the range is local. */
  waitFor(id: number, region: number, first: number, count: number): void {
    if (this.d.phase === DestPhase.SETTLED) return this.d.ready([id])
    this.d.requests.waitFor(id, region, first, count, this.d.phase === DestPhase.POSTCOPY && this.d.urgent !== undefined)
  }

  /** willNeed(): a hint for the push (WILL_NEED) with the missing runs of the range. */
  willNeed(region: number, first: number, count: number): void {
    if (this.d.phase !== DestPhase.POSTCOPY || !this.d.urgent) return
    this.d.requests.request(region, first, count, false)
  }

  /**
   * The service listens on these ports (guest.serve(), per served server): the source's forwarder relays there.
   * True when the forwarded clients' route is set up now, in post-copy (what the agent's yielding waits for).
   */
  announce(ports: (number | null)[]): boolean {
    this.ports = ports
    if (this.d.phase === DestPhase.POSTCOPY || this.d.phase === DestPhase.SETTLED) this.d.bulk?.send(encodeControl(Msg.SERVICE, { ports }))
    return this.d.phase === DestPhase.POSTCOPY
  }

  /** free() during post-copy: missing pages are zero-filled here (unless `filled` already) and never pushed. */
  free(region: number, first: number, count: number, filled = false): void {
    if (this.d.phase !== DestPhase.POSTCOPY || !this.d.hasUffd) return
    this.d.requests.free(region, first, count, filled)
  }
}
