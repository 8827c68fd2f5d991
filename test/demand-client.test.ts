// The destination's demand thread (native/demand_client.cc) on a plain connection: it installs replies to what it
// asked, and refuses a reply that comes before it asked anything on that connection. No source sends one (replies
// answer requests, which follow the hand-off); installed, it raced with the pre-copy owners of the memory (the bulk
// reader's drops, the hand-off's discard list) and left a page marked missing with bytes in it (the TCP fuzzer found
// it: test/fuzz.test.ts).
import { randomBytes } from 'node:crypto'
import { describe, expect, it } from 'vitest'
import { loadBinding } from '../src/binding'
import { pagesHeader } from '../src/protocol/messages'
import { takeSocket } from '../src/socket-fd'
import { kernelSkipReason } from './helpers/gate'
import { tcpPair } from './helpers/tcp'
import { missingRegion } from './helpers/uffd-region'
import { pollUntil } from './helpers/wait'

const skip = kernelSkipReason()
const PAGES = 64
const ARRIVED = 3, CLOSED = 7
const EPROTO = 71, MALFORMED = 1 // native/records.h kMalformed

async function demandClient() {
  const b = loadBinding()
  const ps = b.pageSize
  const { region, uffd } = missingRegion(b, PAGES)
  const received = new Uint32Array(PAGES / 32)
  const events: number[] = []
  const pair = await tcpPair()
  const d = takeSocket(pair.server)!
  const client = new b.DemandClient!(uffd.fd, [region.id], [received], (ev) => events.push(...ev))
  client.attach(d.fd)
  const source = pair.client // the source's end: what it reads are the thread's requests
  const requests: Buffer[] = []
  source.on('data', (c: Buffer) => requests.push(c))
  const eventsOf = (kind: number) => {
    const out: number[][] = []
    for (let i = 0; i < events.length; i += 5) if (events[i] === kind) out.push(events.slice(i + 1, i + 5))
    return out
  }
  const reply = (page: number, bytes: Buffer) => source.write(Buffer.concat([pagesHeader(0, page, 1, ps), bytes]))
  return {
    ps, region, received, client, requests, eventsOf, reply,
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
      expect(t.eventsOf(CLOSED)[0].slice(0, 2)).toEqual([EPROTO, MALFORMED])
      expect(t.eventsOf(ARRIVED)).toEqual([])
      expect(t.received[0]).toBe(0)
      // the page is still missing: the thread asked nothing and installed nothing (a request would show on the wire)
      expect(Buffer.concat(t.requests).length).toBe(0)
    } finally {
      t.close()
    }
  })
})
if (skip) console.warn(`demand-client.test: skipped: ${skip}`)
