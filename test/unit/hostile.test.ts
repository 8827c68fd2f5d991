/**
 * Hostile and stuck peers against a real destination engine (fake binding,
 * in-memory transports, a fake clock): what an unauthenticated peer may cost,
 * the handshake deadline, the slot of a session that never starts, the
 * stuck-source rules, and the one rule for a page that arrives twice after
 * the hand-off.
 */
import { describe, expect, it } from 'vitest'
import { PageBitmap } from '../../src/bitmap'
import { MigrationDestination } from '../../src/agent/destination/index'
import { DestPhase } from '../../src/agent/destination/machine'
import type { UffdMigrateError } from '../../src/errors'
import { Channel } from '../../src/protocol/channel'
import { clientHandshake, peerError } from '../../src/protocol/handshake'
import { encodeControl, encodeRuns, Msg, pagesHeader, RangeKind } from '../../src/protocol/messages'
import { Region } from '../../src/region'
import { FakeBinding } from '../../src/testing/fake-binding'
import { FakeClock } from '../../src/testing/fake-clock'
import { MemoryTransport } from '../../src/testing/memory-transport'
import { drive, type Driven, open, turns } from './helpers/raw-source'
import { PS, TOKEN } from './helpers/wire'

function listening(clock: FakeClock) {
  const binding = new FakeBinding(PS)
  const region = Region.create('r', 8 * PS, binding)
  const refused: string[] = []
  const ended: string[] = []
  const dest = new MigrationDestination(binding, [region], [new PageBitmap(8)], { token: TOKEN, bulkBufferBytes: 0, clock }, {
    restore: async () => 1, settled: () => {}, ready: () => {}, failed: () => {},
    refused: (m) => refused.push(m),
    sessionEnded: (e) => ended.push((e as UffdMigrateError).code),
  })
  return { dest, refused, ended }
}

/** A raw peer: its end of an in-memory connection the destination accepted. */
function rawPeer(dest: MigrationDestination): MemoryTransport {
  const [a, b] = MemoryTransport.pair()
  void dest.accept(b, 'peer:1')
  return a
}

const encodePages = (region: number, first: number, count: number, data: Buffer) => [pagesHeader(region, first, count, PS), data]

/** Moves the fake clock on and lets the engine run. */
async function advance(clock: FakeClock, ms: number): Promise<void> {
  clock.advance(ms)
  await turns()
}

/** A live source for ms: KEEPALIVE on urgent every second. */
async function keepAlive(d: Driven, clock: FakeClock, ms: number): Promise<void> {
  for (let t = 0; t < ms; t += 1000) {
    d.urgent.send(encodeControl(Msg.KEEPALIVE, {}))
    await turns()
    await advance(clock, 1000)
  }
}

const refusalsOf = (d: MigrationDestination) => (d as unknown as { link: { refusals: Record<string, number> } }).link.refusals

describe('before authentication', () => {
  it('refuses a frame larger than a handshake message from its header, before buffering its body', async () => {
    const { dest, refused } = listening(new FakeClock())
    const peer = rawPeer(dest)
    const header = Buffer.alloc(5)
    header.writeUInt32BE(64 << 20, 0)
    header[4] = Msg.HELLO
    peer.write(header)
    peer.write(Buffer.alloc(60_000)) // the start of the 64 MiB it announced
    await turns()
    expect(refused).toHaveLength(1)
    expect(refused[0]).toMatch(/refused a connection from peer:1: expected a frame of 1\.\.4097 bytes, got a length of 67108864 \[ERR_MIGRATION_PROTOCOL\]/)
    expect(peer.destroyed || peer.peer.destroyed).toBe(true)
    expect(refusalsOf(dest)).toEqual({ ERR_MIGRATION_PROTOCOL: 1 })
  })

  it('closes a connection that does not authenticate within the handshake deadline', async () => {
    const clock = new FakeClock()
    const { dest, refused } = listening(clock)
    rawPeer(dest) // connects, says nothing
    await turns()
    await advance(clock, 4999)
    expect(refused).toEqual([])
    await advance(clock, 2)
    expect(refused).toEqual(['refused a connection from peer:1: did not authenticate within 5000 ms [ERR_MIGRATION_TIMEOUT]'])
  })

  it('holds frames sent ahead of the handshake in TCP (reading stops), not in memory', async () => {
    const { dest } = listening(new FakeClock())
    const [a, b] = MemoryTransport.pair()
    void dest.accept(b, 'peer:1')
    // a HELLO that waits for nothing, then many small frames in one chunk each
    const junk = Buffer.concat(Array.from({ length: 50 }, () => Buffer.concat(encodeControl(Msg.AUTH, { proof: Buffer.alloc(32) }))))
    for (let i = 0; i < 20; i++) a.write(junk)
    await turns()
    // the destination read the first chunk and then paused: the rest is unread on the writer's side
    expect(b.isPaused()).toBe(true)
    expect(a.unread).toBeGreaterThan(junk.length * 15)
  })

  it('beyond the cap on unauthenticated connections the oldest makes room, so a flood cannot keep a real source out', async () => {
    const clock = new FakeClock()
    const { dest, refused } = listening(clock)
    const idle = Array.from({ length: 20 }, () => rawPeer(dest))
    await turns()
    expect(refused).toHaveLength(4)
    expect(refused[0]).toMatch(/closed to make room: 16 connections were authenticating at once \(the limit\), the oldest goes first \[ERR_MIGRATION_BUSY\]/)
    expect(idle.slice(0, 4).every((t) => t.destroyed)).toBe(true)
    expect(idle.slice(4).some((t) => t.destroyed)).toBe(false)
    // a real source among 16 idle ones: it evicts one and authenticates
    const links: MemoryTransport[] = []
    const ch = await open(dest, 'urgent', 's1', links)
    expect(ch.failed).toBeUndefined()
    expect(refusalsOf(dest)).toEqual({ ERR_MIGRATION_BUSY: 5 })
    await advance(clock, 5001)
    // 15 idle ones past the handshake deadline, and s1's slot (it never sent REGIONS)
    expect(refusalsOf(dest)).toEqual({ ERR_MIGRATION_BUSY: 5, ERR_MIGRATION_TIMEOUT: 16 })
  })
})

describe('the slot of a session', () => {
  it('lapses when the session does not send REGIONS within the deadline; meanwhile another source hears BUSY with retryAfterMs', async () => {
    const clock = new FakeClock()
    const { dest, ended } = listening(clock)
    const links: MemoryTransport[] = []
    const squatter = await open(dest, 'urgent', 'squatter', links)
    const told: UffdMigrateError[] = []
    squatter.onFrame((f) => void (f.type === Msg.ERROR && told.push(peerError(f.payload))))
    clock.advance(1000)
    const [a, b] = MemoryTransport.pair()
    void dest.accept(b, 'peer:2')
    const busy = await clientHandshake(new Channel(a, 'urgent'), TOKEN, { role: 'urgent', session: 'real' }).then(() => undefined, (e: UffdMigrateError) => e)
    expect(busy?.code).toBe('ERR_MIGRATION_BUSY')
    expect(busy?.retryAfterMs).toBe(4050)
    await advance(clock, 4100)
    expect(ended).toEqual(['ERR_MIGRATION_TIMEOUT'])
    expect(told.map((e) => e.code)).toEqual(['ERR_MIGRATION_TIMEOUT'])
    expect(told[0].message).toMatch(/session squatter authenticated but did not send its region table within 5000 ms/)
    expect(dest.phase).toBe(DestPhase.LISTENING)
    const real = await open(dest, 'urgent', 'real', links)
    expect(real.failed).toBeUndefined()
    expect(refusalsOf(dest).ERR_MIGRATION_TIMEOUT).toBe(1)
  })
})

describe('a pre-copy session that another connection asks for', () => {
  /** A connection of `session` tries to join: undefined, or the error it was refused with. */
  const join = async (d: Driven, session: string) => {
    const [a, b] = MemoryTransport.pair()
    void d.dest.accept(b, 'peer:3')
    const ch = new Channel(a, 'urgent')
    return { ch, err: await clientHandshake(ch, TOKEN, { role: 'urgent', session }).then(() => undefined, (e: UffdMigrateError) => e) }
  }

  it('another source hears BUSY; with retryAfterMs (when the watchdog drops it) once the session went quiet, not while its source streams', async () => {
    const clock = new FakeClock()
    const d = await drive(DestPhase.PRECOPY, { clock, regions: { linkTimeoutMs: 4000 } })
    await keepAlive(d, clock, 1000) // alive: a byte within the last tick
    d.urgent.send(encodeControl(Msg.KEEPALIVE, {}))
    await turns()
    const live = (await join(d, 'another')).err
    expect(live).toMatchObject({ code: 'ERR_MIGRATION_BUSY', message: 'peer reported: a migration is already in progress on this destination' })
    expect(live?.retryAfterMs).toBeUndefined()
    await advance(clock, 1000) // quiet for a second (a reset that reached its source only)
    const quiet = (await join(d, 'another')).err
    expect(quiet?.code).toBe('ERR_MIGRATION_BUSY')
    expect(quiet?.message).toMatch(/its source has sent nothing for a while and is dropped as stuck in \d+ ms: try again then/)
    expect(quiet?.retryAfterMs).toBeGreaterThanOrEqual(3000 + 300 - 100) // 4000 - ~1000 quiet + the margin, to a tick
    expect(quiet?.retryAfterMs).toBeLessThanOrEqual(3000 + 300 + 100)
    await advance(clock, quiet!.retryAfterMs!)
    expect(d.dest.phase).toBe(DestPhase.LISTENING)
    expect(d.events).toContain('ended: ERR_MIGRATION_CONNECTION')
    expect((await join(d, 'another')).err).toBeUndefined() // the next source gets in
  })

  it('its own session dialling in again (HANDOFF lost with a reset it alone saw): the session ends, and RECOVER hears NO_SESSION', async () => {
    const clock = new FakeClock()
    const d = await drive(DestPhase.PRECOPY, { clock, regions: { linkTimeoutMs: 4000 } })
    const links: MemoryTransport[] = []
    const urgent = await open(d.dest, 'urgent', 'raw-session', links) // admitted: the old connections failed
    expect(d.events).toContain('ended: ERR_MIGRATION_CONNECTION')
    expect(d.dest.phase).toBe(DestPhase.LISTENING)
    const bulk = await open(d.dest, 'bulk', 'raw-session', links)
    expect([urgent.failed, bulk.failed]).toEqual([undefined, undefined])
    bulk.send(encodeControl(Msg.RECOVER, {}))
    const answer = await bulk.nextFrame()
    expect(answer.type).toBe(Msg.ERROR)
    expect(peerError(answer.payload)).toMatchObject({ code: 'ERR_MIGRATION_NO_SESSION' })
  })
})

describe('a stuck source', () => {
  it('post-copy: a page request unanswered for requestTimeoutMs is a broken link, and the destination recovers', async () => {
    const clock = new FakeClock()
    const d = await drive(DestPhase.POSTCOPY, { clock, regions: { linkTimeoutMs: 10_000, requestTimeoutMs: 2000 } })
    void d.binding.touch(d.region.id, 3) // a thread faults; the source never answers
    await turns()
    await advance(clock, 1900)
    expect(d.dest.phase).toBe(DestPhase.POSTCOPY)
    await advance(clock, 600)
    expect(d.dest.phase).toBe(DestPhase.RECOVERING)
    expect(d.events).toContain('recovering')
  })

  it('post-copy: a ready() wait whose pages never come counts as an unanswered request too', async () => {
    const clock = new FakeClock()
    const d = await drive(DestPhase.POSTCOPY, { clock, regions: { linkTimeoutMs: 60_000, requestTimeoutMs: 2000 } })
    d.dest.service.waitFor(1, 0, 2, 2) // the service awaits region.ready() on pages 2-3
    await turns()
    await advance(clock, 1900)
    expect(d.dest.phase).toBe(DestPhase.POSTCOPY)
    await advance(clock, 600)
    expect(d.dest.phase).toBe(DestPhase.RECOVERING)
  })

  it('post-copy: nothing on either connection for linkTimeoutMs while pages are missing is a broken link; KEEPALIVE is progress', async () => {
    const clock = new FakeClock()
    const d = await drive(DestPhase.POSTCOPY, { clock, regions: { linkTimeoutMs: 4000 } })
    for (let t = 0; t < 12_000; t += 1000) {
      d.urgent.send(encodeControl(Msg.KEEPALIVE, {}))
      await turns()
      clock.advance(1000)
      await turns()
    }
    expect(d.dest.phase).toBe(DestPhase.POSTCOPY)
    await advance(clock, 4500)
    expect(d.dest.phase).toBe(DestPhase.RECOVERING)
  })

  it('a frame left half-sent for linkTimeoutMs is a broken link', async () => {
    const clock = new FakeClock()
    const d = await drive(DestPhase.POSTCOPY, { clock, regions: { linkTimeoutMs: 4000 } })
    const frame = Buffer.concat(encodePages(0, 0, 1, Buffer.alloc(PS, 7)))
    d.links.at(-1)!.write(frame.subarray(0, 100)) // bulk: header and the start of the page
    for (let t = 0; t < 4000; t += 1000) {
      d.urgent.send(encodeControl(Msg.KEEPALIVE, {})) // the other connection is alive
      await turns()
      clock.advance(1000)
      await turns()
    }
    await advance(clock, 2000)
    expect(d.dest.phase).toBe(DestPhase.RECOVERING)
  })

  it('post-copy: PUSH_END with pages missing, then silence: recovery after linkTimeoutMs (plus at most two checks, a fifth of it each)', async () => {
    const clock = new FakeClock()
    const d = await drive(DestPhase.POSTCOPY, { clock, regions: { linkTimeoutMs: 3000, requestTimeoutMs: 60_000 } })
    d.bulk.send(encodeControl(Msg.PUSH_END, {}))
    await turns()
    expect(d.dest.phase).toBe(DestPhase.POSTCOPY) // pages are missing: not settled
    await advance(clock, 2500)
    expect(d.dest.phase).toBe(DestPhase.POSTCOPY)
    await advance(clock, 1700) // 4200 = 3000 + 2 * 600
    expect(d.dest.phase).toBe(DestPhase.RECOVERING)
  })

  it('extra bulk streams: only as many as REGIONS_OK granted (none without the native reader), only the session\'s, only in pre-copy', async () => {
    const d = await drive(DestPhase.PRECOPY, { regions: { streams: 4 } })
    const stream = async (session: string) => {
      const [a, b] = MemoryTransport.pair()
      void d.dest.accept(b, 'peer:2')
      return clientHandshake(new Channel(a, 'stream'), TOKEN, { role: 'stream', session }).then(() => undefined, (e: UffdMigrateError) => e)
    }
    // the fake binding has no native bulk reader: REGIONS_OK granted bulk alone
    expect(await stream('raw-session')).toMatchObject({ code: 'ERR_MIGRATION_PROTOCOL', message: expect.stringMatching(/more extra bulk streams than the 0 granted/) })
    expect(await stream('another')).toMatchObject({ code: 'ERR_MIGRATION_BUSY' })
    expect(d.events.filter((e) => e.startsWith('refused: '))).toHaveLength(2)
    // the session goes on
    expect(d.dest.phase).toBe(DestPhase.PRECOPY)
  })

  it('post-copy: the session\'s source dialling in again means its old connections are dead (recovering); another session is BUSY', async () => {
    const d = await drive(DestPhase.POSTCOPY)
    const dial = (session: string) => {
      const [a, b] = MemoryTransport.pair()
      void d.dest.accept(b, 'peer:3')
      return clientHandshake(new Channel(a, 'urgent'), TOKEN, { role: 'urgent', session }).then(() => undefined, (e: UffdMigrateError) => e)
    }
    expect(await dial('another')).toMatchObject({ code: 'ERR_MIGRATION_BUSY' })
    expect(d.dest.phase).toBe(DestPhase.POSTCOPY)
    expect(await dial('raw-session')).toBeUndefined()
    expect(d.dest.phase).toBe(DestPhase.RECOVERING)
    expect(d.events.filter((e) => e === 'recovering' || e.startsWith('refused'))).toEqual([
      'refused: refused a connection from peer:3: a migration is already in progress on this destination [ERR_MIGRATION_BUSY]',
      'recovering',
    ])
  })

  it('pre-copy: a quiet source ends the session and the destination listens again', async () => {
    const clock = new FakeClock()
    const d = await drive(DestPhase.PRECOPY, { clock, regions: { linkTimeoutMs: 4000 } })
    await advance(clock, 3000)
    expect(d.dest.phase).toBe(DestPhase.PRECOPY)
    await advance(clock, 3000)
    expect(d.dest.phase).toBe(DestPhase.LISTENING)
    expect(d.events).toContain('ended: ERR_MIGRATION_CONNECTION')
  })
})

describe('after the hand-off, a page the destination holds', () => {
  it('is ignored when known-zero (the zero page, installed when it was learnt), not written over', async () => {
    const d = await drive(DestPhase.PRECOPY)
    d.bulk.send(encodeRuns(Msg.RANGES, RangeKind.ZERO, 0, [0, 4]))
    await turns()
    // installed before the hand-off: the service's first touch after it is no fault
    expect([0, 1, 2, 3].map((p) => d.binding.isPresent(d.region.id, p))).toEqual([true, true, true, true])
    d.bulk.send(encodeControl(Msg.HANDOFF, { state: new Uint8Array(0), discard: [new Uint8Array(0)], recoveryTimeoutMs: 60_000 }))
    await turns()
    d.urgent.send(encodePages(0, 2, 1, Buffer.alloc(PS, 0xee))) // a page known to be zero
    await turns()
    expect(new Uint8Array(d.region.buffer, 2 * PS, PS).every((b) => b === 0)).toBe(true)
    expect(d.errors.urgent).toEqual([])
    expect(d.dest.phase).toBe(DestPhase.POSTCOPY)
  })

  it('a RANGES frame whose first run completes the migration: the rest is ignored, no error; data after settled is ignored on both channels', async () => {
    const d = await drive(DestPhase.PRECOPY)
    d.bulk.send(encodeRuns(Msg.RANGES, RangeKind.ZERO, 0, [0, 4]))
    d.bulk.send(encodeControl(Msg.HANDOFF, { state: new Uint8Array(0), discard: [new Uint8Array(0)], recoveryTimeoutMs: 60_000 }))
    await turns()
    d.bulk.send(encodeRuns(Msg.RANGES, RangeKind.ZERO, 0, [4, 4, 0, 2]))
    await turns()
    expect(d.dest.phase).toBe(DestPhase.SETTLED)
    d.bulk.send(encodePages(0, 5, 1, Buffer.alloc(PS, 1)))
    d.urgent.send(encodePages(0, 6, 1, Buffer.alloc(PS, 1)))
    await turns()
    expect(d.errors.bulk.map((e) => e.code)).toEqual([])
    expect(d.errors.urgent).toEqual([])
  })
})

describe('a stuck destination, seen from the writer', () => {
  it('a write that cannot drain for stallTimeoutMs fails the connection as broken', async () => {
    const [a, b] = MemoryTransport.pair(64 * 1024)
    b.pause() // the peer stopped reading
    const ch = new Channel(a, 'bulk')
    ch.authenticated()
    ch.stallTimeoutMs = 100
    while (ch.send(Buffer.alloc(16 * 1024))) {
      // fill the window
    }
    const closed = new Promise<UffdMigrateError>((resolve) => ch.onClose((e) => resolve(e as UffdMigrateError)))
    await ch.drain()
    const err = await closed
    expect(err.code).toBe('ERR_MIGRATION_CONNECTION')
    expect(err.message).toMatch(/bulk connection stalled: the peer has not read for 100 ms/)
  })
})

describe('a source that reached the wrong peer', () => {
  it('an address that answers as a web server (or a middlebox) is a connect failure that says what to check, not a protocol error', async () => {
    const [a, b] = MemoryTransport.pair()
    b.on('data', () => b.write(Buffer.from('HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n')))
    const err = await clientHandshake(new Channel(a, 'urgent'), TOKEN, { role: 'urgent', session: 's' }).then(() => undefined, (e: UffdMigrateError) => e)
    // CONNECT: post-copy recovery dials again until its deadline (the proxy answered for a host that was unreachable)
    expect(err?.code).toBe('ERR_MIGRATION_CONNECT')
    expect(err?.message).toMatch(/the address answered, but not as a uffd-migrate destination \(expected a frame of 1\.\.4097 bytes, got a length of \d+\): is `uffd-migrate receive` listening there\?/)
  })
})

describe('after the hand-off, a frame from the source that breaks the protocol', () => {
  /** The session's source comes back: a new pair, RECOVER; what the destination says it holds. */
  async function comeBack(d: Driven): Promise<void> {
    const links: MemoryTransport[] = []
    d.urgent = await open(d.dest, 'urgent', 'raw-session', links)
    d.bulk = await open(d.dest, 'bulk', 'raw-session', links)
    d.bulk.onFrame((f) => void (f.type === Msg.ERROR && d.errors.bulk.push(peerError(f.payload))))
    d.bulk.send(encodeControl(Msg.RECOVER, {}))
    await turns()
    expect(d.dest.phase).toBe(DestPhase.POSTCOPY)
  }
  /** Page 9 of a region of 8: a run no correct source sends (a length or offset changed on the path looks the same). */
  const outOfBounds = () => encodePages(0, 9, 1, Buffer.alloc(PS, 7))

  it('is a broken link, the source not told: it comes back, and the pages it sends then are placed', async () => {
    const d = await drive(DestPhase.POSTCOPY)
    d.bulk.send(encodePages(0, 0, 1, Buffer.alloc(PS, 1)))
    d.bulk.send(outOfBounds())
    await turns()
    // (before: ERROR to the source, and the migration failed here, with the service that runs here on pages it lacks)
    expect(d.dest.phase).toBe(DestPhase.RECOVERING)
    expect(d.errors.bulk).toEqual([])
    expect(d.recoveryLines).toEqual([expect.stringMatching(/^the connection broke during post-copy \(a frame that broke the protocol, 1 of 3 recovered from: .*\); waiting up to 60000 ms/)])
    await comeBack(d)
    d.bulk.send(encodePages(0, 1, 7, Buffer.alloc(7 * PS, 2)))
    await turns()
    expect(d.dest.phase).toBe(DestPhase.SETTLED)
    expect(new Uint8Array(d.region.buffer, 0, PS).every((b) => b === 1)).toBe(true) // placed before the bad frame: kept
    expect(new Uint8Array(d.region.buffer, PS, 7 * PS).every((b) => b === 2)).toBe(true)
  })

  it('a HANDOFF whose recoveryTimeoutMs is not a number (below 0, missing) is refused before it takes effect (taken for 0, it turned recovery off for the service that then ran here)', async () => {
    const d = await drive(DestPhase.PRECOPY)
    d.bulk.send(encodeControl(Msg.HANDOFF, { state: new Uint8Array(0), discard: [new Uint8Array(0)], recoveryTimeoutMs: 'soon' }))
    await turns()
    expect(d.errors.bulk).toEqual([expect.objectContaining({ code: 'ERR_MIGRATION_PROTOCOL', serviceStarted: false, message: 'peer reported: expected HANDOFF.recoveryTimeoutMs to be number, got "soon"' })])
    expect(d.dest.phase).toBe(DestPhase.LISTENING)
    const again = await drive(DestPhase.PRECOPY) // (and below 0: no source sends one)
    again.bulk.send(encodeControl(Msg.HANDOFF, { state: new Uint8Array(0), discard: [new Uint8Array(0)], recoveryTimeoutMs: -1 }))
    await turns()
    expect(again.errors.bulk).toEqual([expect.objectContaining({ code: 'ERR_MIGRATION_PROTOCOL', message: 'peer reported: expected HANDOFF.recoveryTimeoutMs of 0 or more, got -1' })])
    const missing = await drive(DestPhase.PRECOPY) // (or missing: a changed byte in its key's name)
    missing.bulk.send(encodeControl(Msg.HANDOFF, { state: new Uint8Array(0), discard: [new Uint8Array(0)], recoveryTimeoutMz: 60_000 }))
    await turns()
    expect(missing.errors.bulk).toEqual([expect.objectContaining({ code: 'ERR_MIGRATION_PROTOCOL', message: 'peer reported: expected HANDOFF.recoveryTimeoutMs to be number, got undefined' })])
  })

  it('three times per migration: the fourth ends it, the source told why', async () => {
    const d = await drive(DestPhase.POSTCOPY)
    for (let k = 1; k <= 3; k++) {
      d.bulk.send(outOfBounds())
      await turns()
      expect(d.dest.phase).toBe(DestPhase.RECOVERING)
      expect(d.recoveryLines.at(-1)).toMatch(new RegExp(`a frame that broke the protocol, ${k} of 3 recovered from`))
      await comeBack(d)
    }
    d.bulk.send(outOfBounds())
    await turns()
    expect(d.dest.phase).toBe(DestPhase.FAILED)
    expect(d.errors.bulk).toEqual([expect.objectContaining({ code: 'ERR_MIGRATION_PROTOCOL' })])
    expect(await d.failure).toMatchObject({ code: 'ERR_MIGRATION_PROTOCOL' })
  })
})
