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
import type { SealState } from '../src/protocol/records'
import { Region } from '../src/region'
import { takeSocket } from '../src/socket-fd'
import { Relay } from '../src/testing/relay'
import { runDoctor } from '../src/doctor'
import { kernelSkipReason } from './helpers/gate'
import { missingRegion } from './helpers/uffd-region'
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
  const src = Region.create('src', PAGES * ps)
  const srcBytes = new Uint8Array(src.buffer)
  // every page distinct and not zero: a page that arrives at the wrong place or not at all shows
  for (let p = 0; p < PAGES; p++) srcBytes.set(randomBytes(ps), p * ps)
  const pending = new Uint32Array(PAGES / 32).fill(0xffffffff)
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
