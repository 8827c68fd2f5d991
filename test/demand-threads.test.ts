// The demand connection's native threads on a plain connection, each against a peer that breaks the rules (their
// sealed twins: test/native-sealing.test.ts).
// - The destination's (native/demand_client.cc) installs replies to what it asked, and refuses a reply that comes
//   before it asked anything on that connection. No source sends one (replies answer requests, which follow the
//   hand-off); installed, it raced with the pre-copy owners of the memory (the bulk reader's drops, the hand-off's
//   discard list) and left a page marked missing with bytes in it (the TCP fuzzer found it: test/fuzz.test.ts).
// - The source's (native/demand_server.cc) answers requests from region memory with writev: a request for pages
//   outside a region would send whatever lies past it, so it breaks the link instead and sends nothing.
import { randomBytes } from 'node:crypto'
import { describe, expect, it } from 'vitest'
import { loadBinding } from '../src/binding'
import { encodeRuns, Msg, pagesHeader } from '../src/protocol/messages'
import { takeSocket } from '../src/socket-fd'
import { kernelSkipReason } from './helpers/gate'
import { tcpPair } from './helpers/tcp'
import { missingRegion, sourceRegion } from './helpers/uffd-region'
import { pollUntil } from './helpers/wait'

const skip = kernelSkipReason()
const PAGES = 64
const ARRIVED = 3, CLOSED = 7, SENT = 2 // native/demand.h's events
const FAULT = 1 // RequestKind.FAULT
const EPROTO = 71, MALFORMED = 1 // native/records.h kMalformed

/** A thread's events of one kind, each its four numbers (native/demand.h: five numbers an event, the kind first). */
function eventsOfKind(events: number[], kind: number): number[][] {
  const out: number[][] = []
  for (let i = 0; i < events.length; i += 5) if (events[i] === kind) out.push(events.slice(i + 1, i + 5))
  return out
}

async function demandClient() {
  const b = loadBinding()
  const ps = b.pageSize
  const { region, uffd } = missingRegion(b, PAGES)
  const received = new Uint32Array(PAGES / 32)
  const events: number[] = []
  const pair = await tcpPair()
  const d = takeSocket(pair.server)!
  const client = new b.DemandClient!(uffd.fd, [region.id], [received], (ev) => events.push(...ev))
  const linkId = client.attach(d.fd)
  const source = pair.client // the source's end: what it reads are the thread's requests
  const requests: Buffer[] = []
  source.on('data', (c: Buffer) => requests.push(c))
  const eventsOf = (kind: number) => eventsOfKind(events, kind)
  const reply = Object.assign((page: number, bytes: Buffer) => source.write(Buffer.concat([pagesHeader(0, page, 1, ps), bytes])), {
    /** Any bytes, as a source that breaks the rules writes them. */
    raw: (bytes: Buffer) => source.write(bytes),
  })
  return {
    ps, region, received, client, requests, eventsOf, reply, linkId,
    close() {
      client.close()
      uffd.close()
      region.release()
      pair.close()
    },
  }
}

describe.skipIf(skip)('the demand thread takes only replies to what it asked', () => {
  it('installs the reply to its request: the bytes in place, the page marked here', async () => {
    const t = await demandClient()
    try {
      t.client.ask(0, Uint32Array.from([5]))
      expect(await pollUntil(() => Buffer.concat(t.requests).length > 0, 5000)).toBe(true)
      const bytes = randomBytes(t.ps)
      t.reply(5, bytes)
      expect(await pollUntil(() => t.eventsOf(ARRIVED).length > 0, 5000)).toBe(true)
      expect(t.eventsOf(ARRIVED)[0]).toEqual([0, 5, 1, 1])
      expect(t.received[0]).toBe(1 << 5)
      expect(Buffer.from(new Uint8Array(t.region.buffer, 5 * t.ps, t.ps)).equals(bytes)).toBe(true)
      expect(t.eventsOf(CLOSED)).toEqual([])
    } finally {
      t.close()
    }
  })

  it('refuses a reply before any request on the connection: the link breaks as malformed and nothing is installed', async () => {
    const t = await demandClient()
    try {
      t.reply(3, randomBytes(t.ps))
      expect(await pollUntil(() => t.eventsOf(CLOSED).length > 0, 5000)).toBe(true)
      // (the third number: the connection's id, as attach() returned it)
      expect(t.eventsOf(CLOSED)[0].slice(0, 3)).toEqual([EPROTO, MALFORMED, t.linkId])
      expect(t.eventsOf(ARRIVED)).toEqual([])
      expect(t.received[0]).toBe(0)
      // the page is still missing: the thread asked nothing and installed nothing (a request would show on the wire)
      expect(Buffer.concat(t.requests).length).toBe(0)
    } finally {
      t.close()
    }
  })
})

/** The source's demand thread over a region of PAGES distinct pages, all pending; `dest` is the destination's end. */
async function demandServer() {
  const b = loadBinding()
  const ps = b.pageSize
  const { region, bytes, pending } = sourceRegion(b, PAGES)
  const events: number[] = []
  const pair = await tcpPair()
  const s = takeSocket(pair.client)!
  const server = new b.DemandServer!(s.fd, [region.id], [pending], (ev) => events.push(...ev), new Uint8Array(0))
  const dest = pair.server
  const got: Buffer[] = []
  dest.on('data', (c: Buffer) => got.push(c))
  const eventsOf = (kind: number) => eventsOfKind(events, kind).map((e) => e.slice(0, 3))
  return {
    ps, bytes, pending, got, eventsOf,
    ask: (region: number, runs: number[]) => dest.write(encodeRuns(Msg.PAGE_REQUEST, FAULT, region, runs)),
    close() {
      server.close()
      region.release()
      pair.close()
    },
  }
}

describe.skipIf(skip)('each connection the demand thread takes has an id of its own, which its end carries', () => {
  it('so that the end of one it left for the next is told from the current one\'s (the agent ignores it)', async () => {
    const t = await demandClient()
    const second = await tcpPair()
    try {
      expect(t.linkId).toBe(1)
      const next = t.client.attach(takeSocket(second.server)!.fd)
      expect(next).toBe(2)
      // the first connection's end, reported after the thread moved on, would carry 1; the second's carries 2
      second.client.write(Buffer.concat([pagesHeader(0, 3, 1, t.ps), randomBytes(t.ps)])) // unasked: malformed
      expect(await pollUntil(() => t.eventsOf(CLOSED).length > 0, 5000)).toBe(true)
      expect(t.eventsOf(CLOSED)).toEqual([[EPROTO, MALFORMED, 2, 0]])
      expect(t.client.attach(-1)).toBe(3)
    } finally {
      t.close()
      second.close()
    }
  })
})

describe.skipIf(skip)('the demand thread refuses a reply outside its regions, even once it asked', () => {
  for (const [what, header] of [
    ['a page past the region\'s end', (ps: number) => pagesHeader(0, PAGES, 1, ps)],
    ['a run that reaches past it', (ps: number) => pagesHeader(0, PAGES - 1, 2, ps)],
    ['a region that does not exist', (ps: number) => pagesHeader(1, 0, 1, ps)],
  ] as const) {
    it(`${what}: the link breaks as malformed and nothing is installed`, async () => {
      const t = await demandClient()
      try {
        t.client.ask(0, Uint32Array.from([5]))
        expect(await pollUntil(() => Buffer.concat(t.requests).length > 0, 5000)).toBe(true)
        const h = header(t.ps)
        t.reply.raw(Buffer.concat([h, randomBytes(h.readUInt32BE(13) * t.ps)]))
        expect(await pollUntil(() => t.eventsOf(CLOSED).length > 0, 5000)).toBe(true)
        expect(t.eventsOf(CLOSED)[0].slice(0, 2)).toEqual([EPROTO, MALFORMED])
        expect(t.eventsOf(ARRIVED)).toEqual([])
        expect([...t.received]).toEqual([0, 0])
      } finally {
        t.close()
      }
    })
  }
})

describe.skipIf(skip)('the source\'s demand thread answers only requests inside its regions', () => {
  it('answers a request with the page from region memory, once, and takes it from the pending map', async () => {
    const t = await demandServer()
    try {
      t.ask(0, [7, 1])
      expect(await pollUntil(() => Buffer.concat(t.got).length >= 17 + t.ps, 5000)).toBe(true)
      const reply = Buffer.concat(t.got)
      expect(reply.subarray(0, 17).equals(pagesHeader(0, 7, 1, t.ps))).toBe(true)
      expect(reply.subarray(17, 17 + t.ps).equals(Buffer.from(t.bytes.subarray(7 * t.ps, 8 * t.ps)))).toBe(true)
      expect(t.pending[0]).toBe(~(1 << 7) >>> 0)
      expect(t.eventsOf(SENT)).toEqual([[0, 7, 1]])
      expect(t.eventsOf(CLOSED)).toEqual([])
    } finally {
      t.close()
    }
  })

  for (const [what, region, runs] of [
    ['a run that reaches past the region\'s end', 0, [PAGES - 1, 2]],
    ['a run that starts past it', 0, [PAGES, 1]],
    ['a region that does not exist', 1, [0, 1]],
    ['an empty run', 0, [3, 0]],
  ] as const) {
    it(`refuses ${what}: the link breaks as malformed, nothing is sent, the pending map is untouched`, async () => {
      const t = await demandServer()
      try {
        t.ask(region, [...runs])
        expect(await pollUntil(() => t.eventsOf(CLOSED).length > 0, 5000)).toBe(true)
        expect(t.eventsOf(CLOSED)[0].slice(0, 2)).toEqual([EPROTO, MALFORMED])
        expect(Buffer.concat(t.got).length).toBe(0)
        expect(t.eventsOf(SENT)).toEqual([])
        expect([...t.pending]).toEqual([0xffffffff, 0xffffffff])
      } finally {
        t.close()
      }
    })
  }
})
if (skip) console.warn(`demand-threads.test: skipped: ${skip}`)
