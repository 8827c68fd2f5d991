/**
 * Encrypted migrations (`encrypt`): the sealed record layer (src/protocol/records.ts), the handshake that agrees on
 * it and derives its keys (src/protocol/handshake.ts), and whole migrations over sealed connections, in memory.
 */
import { describe, expect, it } from 'vitest'
import { randomBytes } from 'node:crypto'
import { ErrorCode, migrationError, type UffdMigrateError } from '../../src/errors'
import { Channel } from '../../src/protocol/channel'
import { clientHandshake, serverHandshake } from '../../src/protocol/handshake'
import { decodeControl, encodeControl, encodeRuns, Msg } from '../../src/protocol/messages'
import { MAX_RECORD_PLAINTEXT, Opener, Sealer, SEALED, TAG_BYTES } from '../../src/protocol/records'
import { MemoryTransport } from '../../src/testing/memory-transport'
import type { FakeBinding } from '../../src/testing/fake-binding'
import type { Region } from '../../src/region'
import { makePair, pageBytes, type Pair, PS, sameBytes, sourceOptions, startSource, TOKEN, touchAll } from './helpers/wire'
import type { Dialer } from '../../src/agent/source/link'

const KEY = { key: randomBytes(32), iv: randomBytes(12) }

/** Seals `frames` one send() each, and returns the wire bytes. */
function sealAll(frames: Buffer[], rekeyBytes?: number): Buffer {
  const s = new Sealer(KEY, rekeyBytes)
  return Buffer.concat(frames.flatMap((f) => s.seal([f])))
}

function openAll(wire: Buffer, chunk: number, rekeyBytes?: number): Buffer {
  const out: Buffer[] = []
  const o = new Opener(KEY, (p) => out.push(Buffer.from(p)), 'bulk', rekeyBytes)
  for (let i = 0; i < wire.length; i += chunk) o.feed(wire.subarray(i, i + chunk))
  expect(o.midRecord).toBe(false)
  return Buffer.concat(out)
}

function expectIntegrityFailure(wire: Buffer): void {
  let err: (Error & { code?: string }) | undefined
  try {
    openAll(wire, 4096)
  } catch (e) {
    err = e as Error
  }
  expect(err?.code).toBe('ERR_MIGRATION_CONNECTION')
  expect(err?.message).toMatch(/failed its integrity check/)
}

describe('sealed records', () => {
  it('carry every byte in order, whatever the socket chunks, records split at MAX_RECORD_PLAINTEXT', () => {
    const frames = [randomBytes(5), randomBytes(MAX_RECORD_PLAINTEXT), randomBytes(MAX_RECORD_PLAINTEXT * 2 + 17), randomBytes(1)]
    const wire = sealAll(frames)
    // 1 + 1 + 3 + 1 records, each with a 5-byte header and a tag
    expect(wire.length).toBe(frames.reduce((n, f) => n + f.length, 0) + 6 * (5 + TAG_BYTES))
    for (const chunk of [7, 4096, 1 << 20]) expect(openAll(wire, chunk).equals(Buffer.concat(frames))).toBe(true)
    const small = [randomBytes(3), randomBytes(300), randomBytes(1)]
    expect(openAll(sealAll(small), 1).equals(Buffer.concat(small))).toBe(true)
  })

  it('hide the plaintext: a repeated page pattern is not on the wire', () => {
    const page = Buffer.from(pageBytes(0, 42, 7))
    const wire = sealAll([page, page])
    expect(wire.includes(page.subarray(0, 16))).toBe(false)
    // the same plaintext twice seals differently (a fresh nonce per record)
    expect(wire.subarray(5, 5 + 64).equals(wire.subarray(5 + PS + TAG_BYTES + 5, 5 + PS + TAG_BYTES + 5 + 64))).toBe(false)
  })

  it('rotate keys at the same record on both ends', () => {
    const frames = Array.from({ length: 40 }, (_, i) => randomBytes(1000 + i))
    const wire = sealAll(frames, 4096)
    expect(openAll(wire, 333, 4096).equals(Buffer.concat(frames))).toBe(true)
    // an opener that did not rotate cannot read past the first rotation
    expectIntegrityFailure(wire)
  })

  it('refuse a changed byte anywhere, a replayed, a dropped or a reordered record', () => {
    const frames = [randomBytes(100), randomBytes(200), randomBytes(300)]
    const wire = sealAll(frames)
    const [r1, r2, r3] = [wire.subarray(0, 105 + TAG_BYTES), wire.subarray(105 + TAG_BYTES, 2 * 105 + 100 + 2 * TAG_BYTES), wire.subarray(2 * 105 + 100 + 2 * TAG_BYTES)]
    expect(Buffer.concat([r1, r2, r3]).equals(wire)).toBe(true)
    // (a header's type byte, at 4, is a protocol error: tested below)
    for (const at of [3, 5, 50, 104, 105, 120, wire.length - 1]) {
      const bad = Buffer.from(wire)
      bad[at] ^= 0x01
      expectIntegrityFailure(bad)
    }
    expectIntegrityFailure(Buffer.concat([r1, r1, r2, r3])) // replayed
    expectIntegrityFailure(Buffer.concat([r1, r3])) // dropped
    expectIntegrityFailure(Buffer.concat([r2, r1, r3])) // reordered
  })

  it('stop a record that claims more than the limit before buffering it, and a plaintext frame', () => {
    const o = new Opener(KEY, () => {}, 'urgent')
    const huge = Buffer.alloc(5)
    huge.writeUInt32BE(MAX_RECORD_PLAINTEXT + TAG_BYTES + 2, 0)
    huge[4] = SEALED
    // (the peer seals everything after its handshake: such bytes were changed on the path, a broken link as a failed tag is)
    const thrown = (f: () => void) => {
      try {
        f()
      } catch (err) {
        return err as UffdMigrateError
      }
      return undefined
    }
    expect(thrown(() => o.feed(huge))).toMatchObject({ code: 'ERR_MIGRATION_CONNECTION', integrity: true, message: expect.stringMatching(/got a length past the limit \(expected a frame of/) })
    const plain = Buffer.concat(encodeControl(Msg.READY, {}))
    expect(thrown(() => new Opener(KEY, () => {}, 'urgent').feed(plain))).toMatchObject({
      code: 'ERR_MIGRATION_CONNECTION', integrity: true, message: expect.stringMatching(/expected a sealed record on the encrypted urgent connection, got a frame of type \d+: its bytes were changed between the hosts/),
    })
    // what the peer sealed is its own: a frame inside a record that breaks the protocol stays a protocol error
    const sealed = Buffer.concat(new Sealer(KEY).seal([Buffer.from([0, 0, 0, 0])]))
    expect(thrown(() => new Opener(KEY, (p) => {
      if (p.readUInt32BE(0) === 0) throw migrationError(ErrorCode.PROTOCOL, 'expected a frame of 1.. bytes, got a length of 0')
    }, 'urgent').feed(sealed))).toMatchObject({ code: 'ERR_MIGRATION_PROTOCOL', message: 'expected a frame of 1.. bytes, got a length of 0' })
    const short = Buffer.alloc(5 + TAG_BYTES)
    short.writeUInt32BE(1 + TAG_BYTES, 0)
    short[4] = SEALED
    expect(thrown(() => new Opener(KEY, () => {}, 'urgent').feed(short))).toMatchObject({ code: 'ERR_MIGRATION_CONNECTION', message: expect.stringMatching(/shorter than its tag/) })
  })
})

async function pollUntilHeld(held: () => Buffer[] | undefined): Promise<void> {
  for (let i = 0; i < 200 && !held()?.length; i++) await new Promise((r) => setTimeout(r, 5))
}

/** A connected pair of channels: the source's end and the destination's. */
function channels(): { client: Channel; server: Channel; wire: { toServer: Buffer[]; toClient: Buffer[] }; a: MemoryTransport } {
  const [a, b] = MemoryTransport.pair()
  const wire = { toServer: [] as Buffer[], toClient: [] as Buffer[] }
  const wa = a.write.bind(a), wb = b.write.bind(b)
  a.write = (c: Buffer) => (wire.toServer.push(Buffer.from(c)), wa(c))
  b.write = (c: Buffer) => (wire.toClient.push(Buffer.from(c)), wb(c))
  return { client: new Channel(a, 'urgent'), server: new Channel(b, 'urgent'), wire, a }
}

describe('the handshake agrees on encryption', () => {
  for (const [client, server] of [[true, false], [false, true], [true, true], [false, false]] as const) {
    it(`source ${client ? 'asks' : 'does not ask'}, destination ${server ? 'insists' : 'does not insist'}: ${client || server ? 'sealed both ways' : 'plaintext'}`, async () => {
      const c = channels()
      const [sv, cl] = await Promise.all([serverHandshake(c.server, TOKEN, () => {}, server), clientHandshake(c.client, TOKEN, { role: 'urgent', session: 's1' }, client)])
      expect(sv.encrypted).toBe(client || server)
      expect(cl.encrypted).toBe(client || server)
      expect(c.client.sealed).toBe(client || server)
      expect(c.server.sealed).toBe(client || server)
      // frames pass both ways after it; a page's pattern is on the wire only in plaintext
      const page = Buffer.from(pageBytes(1, 2, 3))
      const got = new Promise<Buffer>((resolve) => c.server.onFrame((f) => resolve(Buffer.from(f.payload))))
      c.client.send([Buffer.from([0, 0, 16, 1, Msg.PAGES]), page])
      expect((await got).equals(page)).toBe(true)
      const back = new Promise<number>((resolve) => c.client.onFrame((f) => resolve(f.type)))
      c.server.send(encodeControl(Msg.SYNC, {}))
      expect(await back).toBe(Msg.SYNC)
      expect(Buffer.concat(c.wire.toServer).includes(page.subarray(0, 16))).toBe(!(client || server))
      // a sealed connection is never handed to a native thread (its bytes are opened here)
      expect(c.client.useWriter(() => { throw new Error('no writer on a sealed connection') })).toBeUndefined()
    })
  }

  // found in CI: after a recovery the destination's demand thread asks for the faults that wait at once, and its
  // requests (6 KiB) came in the chunk that carried READY; the source took them for an oversized handshake frame
  for (const sealed of [false, true]) {
    it(`a frame larger than any handshake message in READY's chunk is read (${sealed ? 'sealed' : 'plaintext'})`, async () => {
      const c = channels()
      const server = c.server as unknown as { socket: MemoryTransport }
      const t = server.socket, write = t.write.bind(t)
      let held: Buffer[] | undefined
      t.write = (chunk: Buffer) => (held ? (held.push(Buffer.from(chunk)), true) : write(chunk))
      const big = encodeRuns(Msg.PAGE_REQUEST, 1, 0, Array.from({ length: 1500 }, (_, i) => [i * 2, 1]).flat())
      expect(big.length).toBeGreaterThan(4096 + 5)
      const handshakes = Promise.all([
        serverHandshake(c.server, TOKEN, () => void (held = []), sealed), // from READY on, what the server writes is held back
        clientHandshake(c.client, TOKEN, { role: 'demand', session: 's4' }),
      ])
      await new Promise((r) => setImmediate(r))
      await new Promise((r) => setImmediate(r))
      await pollUntilHeld(() => held)
      c.server.send(big)
      const all = Buffer.concat(held!)
      held = undefined
      write(all) // READY and the request: one chunk
      await handshakes
      const got = new Promise<number>((resolve, reject) => (c.client.onFrame((f) => resolve(f.payload.length + 5)), c.client.onClose(reject)))
      expect(await got).toBe(big.length)
      expect(c.client.failed).toBeUndefined()
    })
  }

  it('cannot be talked out of it: a HELLO whose encrypt flag was changed on the way fails authentication', async () => {
    const c = channels()
    // the man in the middle holds the source's HELLO back until it is whole, and passes it on changed
    const write = c.a.write.bind(c.a)
    let hello: Buffer | undefined = Buffer.alloc(0)
    c.a.write = (chunk: Buffer) => {
      if (!hello) return write(chunk)
      hello = Buffer.concat([hello, chunk])
      if (hello.length < 4 || hello.length < hello.readUInt32BE(0) + 4) return true
      const m = decodeControl(Msg.HELLO, hello.subarray(5))
      hello = undefined
      expect(m.encrypt).toBe(true)
      return write(Buffer.concat(encodeControl(Msg.HELLO, { ...m, encrypt: false })))
    }
    const [sv, cl] = await Promise.allSettled([serverHandshake(c.server, TOKEN), clientHandshake(c.client, TOKEN, { role: 'urgent', session: 's2' }, true)])
    expect(cl.status).toBe('rejected')
    expect((cl as PromiseRejectedResult).reason.code).toBe('ERR_MIGRATION_AUTH')
    expect((cl as PromiseRejectedResult).reason.message).toMatch(/the destination failed authentication/)
    expect(sv.status).toBe('rejected')
    expect(c.client.sealed).toBe(false)
  })

  it('a destination refusing an authenticated source (busy) says so sealed, and the source reads it', async () => {
    const c = channels()
    const busy = Object.assign(migrationError(ErrorCode.BUSY, 'busy here'), { retryAfterMs: 250 })
    const [sv, cl] = await Promise.allSettled([
      serverHandshake(c.server, TOKEN, () => { throw busy }, true),
      clientHandshake(c.client, TOKEN, { role: 'urgent', session: 's3' }),
    ])
    expect(sv.status).toBe('rejected')
    expect((cl as PromiseRejectedResult).reason.code).toBe('ERR_MIGRATION_BUSY')
    expect((cl as PromiseRejectedResult).reason.retryAfterMs).toBe(250)
  })
})

function fill(src: FakeBinding, regions: Region[]): void {
  regions.forEach((r, i) => {
    for (let p = 0; p < r.pageCount; p += 2) src.write(r.id, p * PS, pageBytes(i, p, 0))
  })
}

/** The pair's dialer, keeping every byte the source writes, as it goes on the wire, in `wire`. */
function tapped(pair: Pair, wire: Buffer[]): Dialer {
  const dial = sourceOptions(pair, 'hybrid').dial!
  return async (host, port, ms) => {
    const t = (await dial(host, port, ms)) as MemoryTransport
    const write = t.write.bind(t)
    t.write = (c: Buffer) => (wire.push(Buffer.from(c)), write(c))
    return t
  }
}

describe('a whole migration over sealed connections, in memory', () => {
  for (const [mode, who] of [['hybrid', 'source'], ['postcopy', 'source'], ['precopy', 'destination']] as const) {
    it(`${mode}, encryption asked by the ${who}: every byte arrives, none of them readable on the wire`, async () => {
      const pair = makePair([200, 50], fill, { encrypt: who === 'destination' })
      const wire: Buffer[] = []
      const { report } = startSource(pair, { mode, extra: { dial: tapped(pair, wire), ...(who === 'source' ? { encrypt: true } : {}) } })
      await pair.restored
      await touchAll(pair, 'random', 5)
      const rep = await report
      await pair.settled
      expect(sameBytes(pair)).toBeUndefined()
      expect(rep.encrypted).toBe(true)
      expect(rep.pagesSentTwiceAfterHandoff).toBe(0)
      expect(rep.streams ?? 1).toBe(1)
      const sent = Buffer.concat(wire)
      expect(sent.length).toBeGreaterThan(100 * PS)
      for (const p of [0, 2, 100, 198]) expect(sent.includes(Buffer.from(pageBytes(0, p, 0)).subarray(0, 32))).toBe(false)
    })
  }

  it('without it, the report says the link was not encrypted, and the pages are on the wire as they are', async () => {
    const pair = makePair([40], fill)
    const wire: Buffer[] = []
    const { report } = startSource(pair, { mode: 'hybrid', extra: { dial: tapped(pair, wire) } })
    await pair.restored
    await touchAll(pair)
    expect((await report).encrypted).toBe(false)
    expect(Buffer.concat(wire).includes(Buffer.from(pageBytes(0, 2, 0)).subarray(0, 32))).toBe(true)
  })
})
