/**
 * Where the destination's service listens (its SERVICE message, once it serve()s), for this side's forwarder:
 * clients of the moved service are relayed there. After SETTLED the source may wait a while for it, since the
 * destination's service can start listening after its memory settled.
 */
import { migrationError, ErrorCode } from '../../errors'
import type { Frame } from '../../protocol/frames'
import { decodeControl, field, Msg } from '../../protocol/messages'
import type { Channel } from '../../protocol/channel'
import { type Clock, sleep, systemClock } from '../clock'
import { deadline } from '../../deadline'
import { askRecoverState, reply } from './link'

export class ServicePorts {
  private known = false
  private announce!: () => void
  private readonly announced = new Promise<void>((r) => (this.announce = r))

  /**
   * forwardTo: the forwarder's hook (the destination's host, a port or null per served server).
   * linkTimeoutMs: how long a redial waits for RECOVER_STATE before it counts as broken (0: the wait's own end only).
   */
  constructor(
    private readonly host: string,
    private readonly forwardTo: ((host: string, ports: (number | null)[]) => void) | undefined,
    private readonly clock: Clock = systemClock,
    private readonly linkTimeoutMs = 0,
  ) {}

  onService(f: Frame): void {
    const m = decodeControl(f.type, f.payload)
    const ports = field<unknown[]>(m, 'ports', 'array', 'SERVICE').map((p, i) => {
      if (p === null) return null
      if (!Number.isInteger(p) || (p as number) < 1 || (p as number) > 65535) throw migrationError(ErrorCode.PROTOCOL, `expected SERVICE.ports[${i}] to be a port or null, got ${JSON.stringify(p)}`)
      return p as number
    })
    this.known = true
    this.forwardTo?.(this.host, ports)
    this.announce()
  }

  /**
   * Resolves once the ports are known, or after `ms`. The link may break before they come (the destination sends them
   * once its service listens, which can be after SETTLED): the destination, settled, listens for its recovery window
   * and answers a RECOVER with its report, then the ports, so `redial` is tried until they come or `ms` passed.
   * Before, the forwarder waited out `ms` and then had nowhere to send the clients it held.
   */
  async wait(ms: number, broke?: Promise<void>, redial?: () => Promise<{ bulk: Channel; close(): void }>): Promise<void> {
    let expired = false, cancel!: () => void
    // (a deadline: after a stop, what arrived meanwhile is read before it ends the wait)
    const late = new Promise<false>((r) => {
      cancel = deadline(this.clock, ms, () => {
        expired = true
        r(false)
      })
    })
    try {
      for (let link = broke; !this.known && link; ) {
        if (!(await Promise.race([this.announced.then(() => false), late, link.then(() => true)])) || !redial) return
        const again = await redial().catch(() => undefined)
        try {
          const service = again && askRecoverState(again.bulk, this.linkTimeoutMs, this.clock).then(() => reply(again.bulk, Msg.SERVICE)).then((f) => this.onService(f))
          service?.catch(() => {}) // late may win the race: its failure after that is nobody's
          if (service) await Promise.race([service, late])
        } catch {
          // the destination went (or refused, or did not answer): try again while there is time
        } finally {
          again?.close()
        }
        link = !this.known && !expired ? sleep(this.clock, 100) : undefined
      }
      if (!this.known) await Promise.race([this.announced, late])
    } finally {
      cancel() // the wait may end long before `ms`
    }
  }
}
