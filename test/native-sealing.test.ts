// Encrypted migrations' connections sealed and opened by the native threads that use them (native/records.h). Here
// the demand connection: the source's DemandServer answers the destination's DemandClient through a relay on the
// path (src/testing/relay.ts), which reads every byte and can change one; the keys are handed over mid-stream, as
// Channel.handOverSealed(true) does after the handshake's sealed frames. The bulk threads' sealing is tested beside
// their other work, against JS's record layer (test/bulk-writer.test.ts, test/bulk-reader.test.ts).
import { once } from 'node:events'
import { connect, createServer, type Socket } from 'node:net'
import { randomBytes } from 'node:crypto'
import { describe, expect, it } from 'vitest'
import { loadBinding, type NativeLinkSeal } from '../src/binding'
import { pagesHeader } from '../src/protocol/messages'
import { Sealer, type SealState } from '../src/protocol/records'
import { takeSocket } from '../src/socket-fd'
import { Relay } from '../src/testing/relay'
import { runDoctor } from '../src/doctor'
import { prng } from '../src/testing/prng'
import { kernelSkipReason } from './helpers/gate'
import { tcpPair } from './helpers/tcp'
import { missingRegion, sourceRegion } from './helpers/uffd-region'
import { pollUntil } from './helpers/wait'

const skip = kernelSkipReason()
const PAGES = 512
const CLOSED = 7, ARRIVED = 3

/** A direction's state as JS hands it over: 9 records and 5000 bytes sealed under the key already, rotating every 64 KiB. */
function state(key: Buffer, iv: Buffer): SealState {
  return { key, iv, seq: 9, bytesUnderKey: 5000, rekeyBytes: 64 << 10 }
}

/** The source dials the destination through a relay, as a migration does: both native threads on their ends. */
async function sealedDemand(relay: Relay) {
  const b = loadBinding()
  const ps = b.pageSize
  const { region: src, bytes: srcBytes, pending } = sourceRegion(b, PAGES)
  const { region: dst, uffd } = missingRegion(b, PAGES)
  const received = new Uint32Array(PAGES / 32)

  const listener = createServer()
  listener.listen(0, '127.0.0.1')
  await once(listener, 'listening')
  const conns: Socket[] = []
  listener.on('connection', (c: Socket) => conns.push(c))
  // (the relay's start() probes the listener with a connection of its own first: the relayed one comes second)
  const addr = await relay.start('127.0.0.1', (listener.address() as { port: number }).port)
  const [host, port] = addr.split(':')
  const sourceSocket = connect(Number(port), host)
  await once(sourceSocket, 'connect')
  await pollUntil(() => conns.length === 2, 5000)
  const destSocket = conns[1]

  const toDest = [randomBytes(32), randomBytes(12)] as const, toSource = [randomBytes(32), randomBytes(12)] as const
  const sourceSeal: NativeLinkSeal = { send: state(...toDest), recv: state(...toSource), cipherHead: new Uint8Array(0) }
  const destSeal: NativeLinkSeal = { send: state(...toSource), recv: state(...toDest), cipherHead: new Uint8Array(0) }
  const sourceEvents: number[] = [], destEvents: number[] = []
  const s = takeSocket(sourceSocket)!, d = takeSocket(destSocket)!
  const server = new b.DemandServer!(s.fd, [src.id], [pending], (ev) => sourceEvents.push(...ev), new Uint8Array(0), sourceSeal)
  const client = new b.DemandClient!(uffd.fd, [dst.id], [received], (ev) => destEvents.push(...ev))
  client.attach(d.fd, destSeal)
  const closedHow = (events: number[]) => {
    const at = events.findIndex((_, i) => i % 5 === 0 && events[i] === CLOSED)
    return at < 0 ? undefined : events[at + 2]
  }
  const arrived = () => destEvents.reduce((n, v, i) => (i % 5 === 0 && v === ARRIVED ? n + destEvents[i + 4] : n), 0)
  return {
    ps, srcBytes, dst, received, client, sourceEvents, destEvents, closedHow, arrived,
    close() {
      client.close()
      server.close()
      uffd.close()
      dst.release()
      src.release()
      sourceSocket.destroy()
      destSocket.destroy()
      relay.close()
      for (const c of conns) c.destroy()
      listener.close()
    },
  }
}

describe.skipIf(skip)('the demand connection sealed on its native threads', () => {
  it("is what the doctor's encryption line reports", () => {
    const line = runDoctor().features.find((f) => f.name === 'encryption')
    expect(line?.available).toBe(true)
    expect(line?.detail).toMatch(/AES-256-GCM over X25519\), native threads moving the pages/)
  })

  it('carries every page asked for intact, and nothing of a page in the clear', async () => {
    const relay = new Relay(Infinity)
    const seen: Buffer[] = []
    relay.tap = (chunk, toDestination) => toDestination && seen.push(Buffer.from(chunk))
    const t = await sealedDemand(relay)
    try {
      // every page, in runs of 64 (the largest reply: its frame is larger than a record, so it takes two) and alone
      const all = Uint32Array.from({ length: PAGES }, (_, i) => i)
      t.client.ask(0, all.subarray(0, 64))
      t.client.ask(0, all.subarray(64).filter((p) => p % 3 === 0))
      t.client.ask(0, all.subarray(64))
      await pollUntil(() => t.arrived() >= PAGES || t.closedHow(t.destEvents) !== undefined, 10_000)
      expect(t.closedHow(t.destEvents)).toBeUndefined()
      expect(t.arrived()).toBe(PAGES)
      expect(Buffer.from(t.dst.buffer).equals(Buffer.from(t.srcBytes))).toBe(true)
      // the wiretap: the pages crossed (2 MiB and more), none of their bytes in the clear
      const wire = Buffer.concat(seen)
      expect(wire.length).toBeGreaterThan(PAGES * t.ps)
      for (const p of [0, 63, 64, 300, PAGES - 1]) expect(wire.indexOf(Buffer.from(t.srcBytes.subarray(p * t.ps + 100, p * t.ps + 164)))).toBe(-1)
    } finally {
      t.close()
    }
  })

  it('stops at a changed byte: the destination installs nothing of that record and hears why (a failed tag)', async () => {
    const relay = new Relay(Infinity)
    relay.corruptAtByte = 100 // inside the first reply (one page: one record)
    const t = await sealedDemand(relay)
    try {
      t.client.ask(0, Uint32Array.from([5]))
      await pollUntil(() => t.closedHow(t.destEvents) !== undefined, 10_000)
      expect(t.closedHow(t.destEvents)).toBe(3) // LinkEnd.TAG_FAILED
      expect(t.arrived()).toBe(0)
      expect(Array.from(t.received).every((w) => w === 0)).toBe(true)
      // the thread waits for the next connection without spinning on the failed one (a sealed link that failed
      // stays readable, "pending", for the thread that held it)
      const cpu0 = t.client.cpuMs
      await new Promise((r) => setTimeout(r, 300))
      expect(t.client.cpuMs - cpu0).toBeLessThan(100)
    } finally {
      t.close()
    }
  })
})

// What someone on the path can do to a sealed stream once the handshake is over (a man in the middle without the
// token, a faulty middlebox): change any byte, lie in a record's length, cut it short, replay, drop or reorder
// records. The destination's bulk reader (the largest reader of sealed bytes) must place every page of the records
// before the first one touched, nothing of it or after it, and end the connection with the reason; never place a
// wrong byte, never crash (this file runs under ASan too: npm run test:asan).
describe.skipIf(skip)('hostile bytes in a sealed stream', () => {
  const MUTATIONS = ['flip', 'length', 'truncate', 'replay', 'drop', 'swap'] as const
  const FRAMES = 16

  for (let seed = 1; seed <= 36; seed++) {
    const kind = MUTATIONS[seed % MUTATIONS.length]
    it(`${kind} (seed ${seed})`, async () => {
      const rand = prng(seed * 7919)
      const b = loadBinding()
      const ps = b.pageSize
      // frames of 1-4 pages over [0, 64): each its own record; record k holds frame k
      const frames: { first: number; count: number; fill: number }[] = []
      for (let p = 0, k = 0; k < FRAMES; k++) {
        const count = 1 + Math.floor(rand() * 4)
        frames.push({ first: p, count, fill: 1 + ((seed * 31 + k) % 250) })
        p += count
      }
      const pages = frames.at(-1)!.first + frames.at(-1)!.count
      const key = { key: randomBytes(32), iv: randomBytes(12) }, REKEY = 16 << 10 // keys rotate inside the stream
      const sealer = new Sealer(key, REKEY)
      const records = frames.map((f) => Buffer.concat(sealer.seal([Buffer.concat([pagesHeader(0, f.first, f.count, ps), Buffer.alloc(f.count * ps, f.fill)])])))
      // the first record the mutation touches: the pages of every record before it arrive, none of it or after it
      const k = 1 + Math.floor(rand() * (FRAMES - 2))
      let wire: Buffer
      let end = false // the sender closes after the bytes (truncate)
      let intact = k // records placed
      if (kind === 'flip') {
        const r = Buffer.from(records[k])
        r[Math.floor(rand() * r.length)] ^= 1 << Math.floor(rand() * 8)
        wire = Buffer.concat([...records.slice(0, k), r, ...records.slice(k + 1)])
      } else if (kind === 'length') {
        const r = Buffer.from(records[k])
        const lies = [0, 1, 16, r.readUInt32BE(0) - 1, r.readUInt32BE(0) + 1, (256 << 10) + 17 + 1, 0xffffffff]
        r.writeUInt32BE(lies[Math.floor(rand() * lies.length)], 0)
        wire = Buffer.concat([...records.slice(0, k), r, ...records.slice(k + 1)])
      } else if (kind === 'truncate') {
        wire = Buffer.concat([...records.slice(0, k), records[k].subarray(0, Math.floor(rand() * records[k].length))])
        end = true
      } else if (kind === 'replay') {
        wire = Buffer.concat([...records.slice(0, k + 1), records[k], ...records.slice(k + 1)])
        intact = k + 1
      } else if (kind === 'drop') {
        wire = Buffer.concat([...records.slice(0, k), ...records.slice(k + 1)])
      } else {
        wire = Buffer.concat([...records.slice(0, k), records[k + 1], records[k], ...records.slice(k + 2)])
      }

      const { region, uffd } = missingRegion(b, pages)
      const received = new Uint32Array(Math.ceil(pages / 32)), zero = new Uint32Array(received.length), freed = new Uint32Array(received.length)
      const { client, server, close } = await tcpPair()
      const closed: number[][] = []
      const onEvents = (ev: Float64Array) => {
        for (let i = 0; i + 5 <= ev.length; i += 5) if (ev[i] === CLOSED) closed.push([ev[i + 1], ev[i + 2]])
      }
      const t = takeSocket(server)!
      const reader = new b.BulkReader!(uffd.fd, [region.id], [received], [zero], [freed], t.fd, t.head, onEvents, false,
        { recv: { ...key, seq: 0, bytesUnderKey: 0, rekeyBytes: REKEY }, cipherHead: new Uint8Array(0) })
      try {
        // in pieces of random size, so that every mutation lands anywhere in a read
        for (let off = 0; off < wire.length;) {
          const n = Math.min(wire.length - off, 1 + Math.floor(rand() * 20_000))
          client.write(wire.subarray(off, off + n))
          off += n
        }
        if (end) client.end()
        await pollUntil(() => closed.length > 0, 5000)
        // how it ended: the stream's end for a cut (errno 0), else a record that failed or bytes that are not one
        const [errno, how] = closed[0]
        if (kind === 'truncate') expect([errno, how]).toEqual([0, 0])
        else expect([errno, [2, 3].includes(how)]).toEqual([74, true]) // EBADMSG, LinkEnd NOT_A_RECORD or TAG_FAILED
        const has = (p: number) => (received[p >> 5] & (1 << (p & 31))) !== 0
        const want = frames.slice(0, intact).reduce((n, f) => n + f.count, 0)
        expect([...Array(pages).keys()].filter(has)).toEqual([...Array(want).keys()])
        const mem = Buffer.from(region.buffer)
        const wrong = frames.slice(0, intact).filter((f) => !mem.subarray(f.first * ps, (f.first + f.count) * ps).equals(Buffer.alloc(f.count * ps, f.fill)))
        expect(wrong).toEqual([])
      } finally {
        reader.close()
        close()
        uffd.close()
        region.release()
      }
    })
  }
})
