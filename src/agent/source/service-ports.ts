/**
 * Where the destination's service listens (its SERVICE message, once it serve()s), for this side's forwarder:
 * clients of the moved service are relayed there. After SETTLED the source may wait a while for it, since the
 * destination's service can start listening after its memory settled.
 */
import { migrationError, ErrorCode } from '../../errors'
import type { Frame } from '../../protocol/frames'
import { decodeControl, encodeControl, field, Msg } from '../../protocol/messages'
import type { Channel } from '../../protocol/channel'
import { reply } from './link'

export class ServicePorts {
  private known = false
  private announce!: () => void
  private readonly announced = new Promise<void>((r) => (this.announce = r))

  /** forwardTo: the forwarder's hook (the destination's host, a port or null per served server). */
  constructor(private readonly host: string, private readonly forwardTo: ((host: string, ports: (number | null)[]) => void) | undefined) {}

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
    const deadline = Date.now() + ms
    const late = new Promise<false>((r) => setTimeout(() => r(false), ms).unref())
    for (let link = broke; !this.known && link; ) {
      if (!(await Promise.race([this.announced.then(() => false), late, link.then(() => true)])) || !redial) return
      const again = await redial().catch(() => undefined)
      try {
        again?.bulk.send(encodeControl(Msg.RECOVER, {}))
        if (again) await Promise.race([reply(again.bulk, Msg.RECOVER_STATE).then(() => reply(again.bulk, Msg.SERVICE)).then((f) => this.onService(f)), late])
      } catch {
        // the destination went (or refused): try again while there is time
      } finally {
        again?.close()
      }
      link = Date.now() < deadline ? new Promise((r) => setTimeout(r, 100).unref()) : undefined
    }
    if (!this.known) await Promise.race([this.announced, late])
  }
}
