/**
 * Where the destination's service listens (its SERVICE message, once it serve()s), for this side's forwarder:
 * clients of the moved service are relayed there. After SETTLED the source may wait a while for it, since the
 * destination's service can start listening after its memory settled.
 */
import { migrationError, ErrorCode } from '../../errors'
import type { Frame } from '../../protocol/frames'
import { decodeControl, field } from '../../protocol/messages'

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

  /** Resolves once the ports are known, or after `ms`. */
  async wait(ms: number): Promise<void> {
    if (!this.known) await Promise.race([this.announced, new Promise((r) => setTimeout(r, ms).unref())])
  }
}
