/**
 * How the fuzzer's connections reach the destination.
 * - memory: in-memory pairs. A connection without a descriptor stays with the
 *   agent's loop, so this fuzzes the JavaScript receive paths (the channel's
 *   decoder, placement, the JS record layer). Deterministic and fast.
 * - tcp: loopback TCP. The destination hands its connections to the addon's
 *   threads as in production: the native bulk reader (plain and sealed) and
 *   the demand thread parse what the fuzzer sends. Real time passes for them
 *   to work, so a session's outcome can depend on scheduling; what is checked
 *   (no crash, no hang, no wrong page, a code on every rejection) does not.
 */
import { once } from 'node:events'
import net from 'node:net'
import type { Transport } from '../../protocol/transport'
import type { FakeClock } from '../fake-clock'
import { MemoryTransport } from '../memory-transport'

export type WireKind = 'memory' | 'tcp'
export const WIRE_KINDS: readonly WireKind[] = ['memory', 'tcp']

/** The fuzzer's end of a connection. */
export type FuzzEnd = MemoryTransport | net.Socket

const loopTurn = () => new Promise((r) => setImmediate(r))

export interface Wire {
  readonly kind: WireKind
  /** A new connection: the fuzzer's end, and the destination's (to accept()). */
  pair(): Promise<[FuzzEnd, Transport]>
  /** Breaks a connection like a reset. */
  cut(end: FuzzEnd): void
  /** Lets the destination work: n turns of the loop (over TCP, a millisecond of real time each, for its threads). */
  turns(n?: number): Promise<void>
  close(): void
}

class MemoryWire implements Wire {
  readonly kind = 'memory'
  async pair(): Promise<[FuzzEnd, Transport]> {
    return MemoryTransport.pair()
  }
  cut(end: FuzzEnd): void {
    ;(end as MemoryTransport).cut()
  }
  async turns(n = 4): Promise<void> {
    for (let i = 0; i < n; i++) await loopTurn()
  }
  close(): void {}
}

class TcpWire implements Wire {
  readonly kind = 'tcp'
  private server: net.Server | undefined
  /** Accepted sockets not paired yet, and who waits for the next one. */
  private accepted: net.Socket[] = []
  private waiting: ((s: net.Socket) => void) | undefined
  private readonly open = new Set<net.Socket>()

  private async listening(): Promise<number> {
    if (!this.server) {
      this.server = net.createServer((s) => {
        this.open.add(s)
        if (this.waiting) this.waiting(s)
        else this.accepted.push(s)
      })
      this.server.listen(0, '127.0.0.1')
      await once(this.server, 'listening')
    }
    return (this.server.address() as net.AddressInfo).port
  }

  async pair(): Promise<[FuzzEnd, Transport]> {
    const port = await this.listening()
    const client = net.connect(port, '127.0.0.1')
    client.on('error', () => {}) // a reset the destination sends is an outcome, read through the channel
    this.open.add(client)
    const server = this.accepted.shift() ?? (await new Promise<net.Socket>((resolve) => (this.waiting = resolve)))
    this.waiting = undefined
    if (client.connecting) await once(client, 'connect')
    return [client, server]
  }

  cut(end: FuzzEnd): void {
    const s = end as net.Socket
    if (!s.destroyed) s.resetAndDestroy()
  }

  async turns(n = 4): Promise<void> {
    for (let i = 0; i < n; i++) {
      await loopTurn()
      await new Promise((r) => setTimeout(r, 1))
    }
  }

  close(): void {
    for (const s of this.open) s.destroy()
    this.open.clear()
    this.server?.close()
  }
}

/** Waits, moving the fake clock on (a quarter of a second at a time), until cond holds; false after maxMs of it. */
export async function until(wire: Wire, clock: FakeClock, cond: () => boolean, maxMs = 120_000): Promise<boolean> {
  for (let t = 0; t <= maxMs; t += 250) {
    await wire.turns()
    if (cond()) return true
    clock.advance(250)
  }
  return false
}

export function createWire(kind: WireKind): Wire {
  return kind === 'tcp' ? new TcpWire() : new MemoryWire()
}
