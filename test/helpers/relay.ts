/**
 * A TCP relay between a source and a destination that can break the link:
 * every open connection reset at once, both ways (as a failing switch or a
 * restarted firewall would), or towards the source only (`oneSided`: the
 * destination's side of each connection stays open and silent, as after a
 * reset that reached one host, or a partition the source noticed first).
 */
import { createServer, type Server, type Socket, connect } from 'node:net'
import { pollUntil } from './wait'

/** Forwards to host:port; cuts every open connection once `cutAfterBytes` went towards the destination. */
export class Relay {
  private server: Server | undefined
  private readonly open = new Set<Socket>()
  private readonly clients = new WeakSet<Socket>()
  bytesToDestination = 0
  cuts = 0
  connections = 0

  /**
   * cutAfterBytes: cut once that much went towards the destination;
   * cutOnType: or cut when a frame of this type comes back from the destination
   * (that frame is lost with the link).
   */
  constructor(private readonly cutAfterBytes: number, private readonly refuseAfterCut = false, private readonly cutOnType?: number) {}

  /** cut() resets the source's side only; the destination's stays open, nothing more forwarded either way. */
  oneSided = false

  /** Towards the destination at most this many bytes per second (0: as fast as it goes). */
  rateBytesPerSec = 0

  /** A relay that never cuts and carries at most bytesPerSec towards the destination: a slow link, so that rounds last. */
  static slow(bytesPerSec: number): Relay {
    const r = new Relay(Infinity)
    r.rateBytesPerSec = bytesPerSec
    return r
  }

  async start(host: string, port: number): Promise<string> {
    // the destination may not listen yet (the source would retry a refused
    // connection, but the relay accepts it and would then drop it)
    await pollUntil(() => canConnect(host, port), 5000, 50)
    this.server = createServer((client) => {
      if (this.refuseAfterCut && this.cuts > 0) return client.destroy()
      this.connections++
      this.clients.add(client)
      const upstream = connect(port, host)
      for (const s of [client, upstream]) {
        this.open.add(s)
        s.on('close', () => this.open.delete(s))
        s.on('error', () => {})
      }
      client.on('data', (chunk: Buffer) => {
        this.bytesToDestination += chunk.length
        upstream.write(chunk)
        if (this.rateBytesPerSec > 0) {
          client.pause()
          setTimeout(() => client.resume(), (chunk.length / this.rateBytesPerSec) * 1000)
        }
        if (this.cuts === 0 && this.bytesToDestination >= this.cutAfterBytes) this.cut()
      })
      // frames coming back: u32 length (type + payload) | u8 type | payload
      let back = Buffer.alloc(0)
      upstream.on('data', (chunk: Buffer) => {
        if (this.cutOnType !== undefined && this.cuts === 0) {
          back = Buffer.concat([back, chunk])
          while (back.length >= 5 && back.length >= 4 + back.readUInt32BE(0)) {
            if (back[4] === this.cutOnType) return this.cut()
            back = back.subarray(4 + back.readUInt32BE(0))
          }
        }
        client.write(chunk)
      })
      client.on('close', () => (this.oneSided && this.cuts > 0 ? upstream.pause() : upstream.destroy()))
      upstream.on('close', () => client.destroy())
    })
    return new Promise((resolve) => this.server!.listen(0, '127.0.0.1', () => resolve(`127.0.0.1:${(this.server!.address() as { port: number }).port}`)))
  }

  /** Every connection reset at once, both ways (oneSided: the source's side only). */
  private cut(): void {
    this.cuts++
    for (const s of this.open) if (!this.oneSided || this.clients.has(s)) s.resetAndDestroy()
  }

  close(): void {
    this.server?.close()
    for (const s of this.open) s.destroy()
  }
}

function canConnect(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(port, host)
    s.once('connect', () => (s.destroy(), resolve(true)))
    s.once('error', () => resolve(false))
  })
}

