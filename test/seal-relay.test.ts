// The seal relay (native/seal_relay.cc) against the JS record layer (src/protocol/records.ts) on real sockets:
// what JS seals the relay opens and the other way round, keys rotating at the same record on both ends (here every
// 64 KiB, in production every 64 GiB), and a changed byte or a plaintext frame stopped before any of it goes on.
import { Socket } from 'node:net'
import { randomBytes } from 'node:crypto'
import { describe, expect, it } from 'vitest'
import { loadBinding } from '../src/binding'
import { runDoctor } from '../src/doctor'
import { encodeControl, Msg } from '../src/protocol/messages'
import { Opener, Sealer } from '../src/protocol/records'
import { socketFd, takeSocket } from '../src/socket-fd'
import { kernelSkipReason } from './helpers/gate'
import { tcpPair } from './helpers/tcp'
import { pollUntil } from './helpers/wait'

const skip = kernelSkipReason()
const KEY = { key: randomBytes(32), iv: randomBytes(12) }
const REKEY = 64 << 10
/** The state JS hands over: seq records and bytesUnderKey bytes sealed under the key already. */
const handedOver = (seq: number, bytesUnderKey: number) => ({ ...KEY, seq, bytesUnderKey, rekeyBytes: REKEY })

/** Everything that arrives on socket, as one buffer once `bytes` came. */
function collect(socket: Socket, bytes: number): Promise<Buffer> {
  const got: Buffer[] = []
  let n = 0
  return new Promise((resolve) => socket.on('data', (c: Buffer) => (got.push(c), (n += c.length) >= bytes && resolve(Buffer.concat(got)))))
}

/** Frames of every size a migration writes: small control frames, pages, a run of whole records. */
function plaintext(): Buffer[] {
  return [Buffer.concat(encodeControl(Msg.ROUND_END, { round: 0 })), randomBytes(4096 * 3 + 13), randomBytes(1 << 20), randomBytes(7), randomBytes(300_000)]
}

describe.skipIf(skip)('seal relay', () => {
  const b = skip ? (undefined as never) : loadBinding()

  it("opens what JS sealed, in order, keys rotating in step with JS's", async () => {
    const { client, server, close } = await tcpPair()
    const events: number[] = []
    const taken = takeSocket(server)!
    const relay = new b.SealRelay!('open', taken.fd, handedOver(0, 0), taken.head, (ev) => events.push(...ev))
    const inner = new Socket({ fd: relay.takeInner(), readable: true, writable: true })
    const frames = plaintext(), total = frames.reduce((n, f) => n + f.length, 0)
    const out = collect(inner, total)
    const sealer = new Sealer(KEY, REKEY)
    for (const f of frames) client.write(Buffer.concat(sealer.seal([f])))
    expect((await out).equals(Buffer.concat(frames))).toBe(true)
    expect(events.filter((_, i) => i % 5 === 0 && events[i] === 7)).toEqual([]) // no CLOSED
    // the peer's end of stream reaches the reader as its own, after every frame
    const ended = new Promise((r) => inner.on('end', r))
    client.end()
    await ended
    relay.close()
    inner.destroy()
    close()
  })

  it('seals what arrives in plaintext, records JS opens with the same key schedule', async () => {
    const { client, server, close } = await tcpPair()
    const relay = new b.SealRelay!('seal', socketFd(server)!, handedOver(5, 1000), new Uint8Array(0), () => {})
    const inner = new Socket({ fd: relay.takeInner(), readable: true, writable: true })
    // the state JS hands over mid-stream: 5 records and 1000 bytes under the key already
    const opened: Buffer[] = []
    const opener = new Opener(KEY, (p) => opened.push(Buffer.from(p)), 'bulk', REKEY)
    const warm = new Sealer(KEY, REKEY)
    for (let i = 0; i < 5; i++) opener.feed(Buffer.concat(warm.seal([Buffer.alloc(i === 0 ? 996 : 1)])))
    opened.length = 0
    let err: Error | undefined
    client.on('data', (c: Buffer) => {
      try {
        opener.feed(c)
      } catch (e) {
        err = e as Error
      }
    })
    const frames = plaintext(), total = frames.reduce((n, f) => n + f.length, 0)
    for (const f of frames) inner.write(f)
    await pollUntil(() => err !== undefined || opened.reduce((n, p) => n + p.length, 0) >= total, 10_000)
    expect(err).toBeUndefined()
    expect(Buffer.concat(opened).equals(Buffer.concat(frames))).toBe(true)
    relay.close()
    inner.destroy()
    close()
  })

  it("is what the doctor's encryption line reports", () => {
    const line = runDoctor().features.find((f) => f.name === 'encryption')
    expect(line?.available).toBe(true)
    expect(line?.detail).toMatch(/AES-256-GCM over X25519\), native threads moving the pages/)
  })

  for (const [what, kind] of [['a changed byte', 3], ['a plaintext frame', 2]] as const) {
    it(`stops at ${what}: nothing of it reaches the reader, JS hears why (LinkEnd ${kind})`, async () => {
      const { client, server, close } = await tcpPair()
      const events: number[] = []
      const taken = takeSocket(server)!
      const relay = new b.SealRelay!('open', taken.fd, handedOver(0, 0), taken.head, (ev) => events.push(...ev))
      const inner = new Socket({ fd: relay.takeInner(), readable: true, writable: true })
      const got: Buffer[] = []
      inner.on('data', (c: Buffer) => got.push(c))
      const sealer = new Sealer(KEY, REKEY)
      const good = Buffer.concat(sealer.seal([Buffer.from('first record')]))
      const second = kind === 3 ? Buffer.concat(sealer.seal([Buffer.from('second record')])) : Buffer.concat(encodeControl(Msg.READY, {}))
      if (kind === 3) second[10] ^= 1
      client.write(Buffer.concat([good, second, Buffer.concat(sealer.seal([Buffer.from('third')]))]))
      await pollUntil(() => events.some((_, i) => i % 5 === 0 && events[i] === 7), 5000)
      const at = events.findIndex((_, i) => i % 5 === 0 && events[i] === 7)
      expect(events[at + 2]).toBe(kind)
      await new Promise((r) => setTimeout(r, 50))
      expect(Buffer.concat(got).toString()).toBe('first record')
      relay.close()
      inner.destroy()
      close()
    })
  }
})
