/**
 * A destination that breaks the protocol, seen from the source (pure tier: fake bindings, in-memory transports).
 * Whatever it says, the source must end (settle, or fail with a code) rather than wait for ever with its memory held,
 * and its service must run on exactly one host. The source-side fuzzer (src/testing/fuzz/source-session.ts) found
 * these; each case here fails without its fix.
 */
import { describe, expect, it } from 'vitest'
import type { MigrationReport } from '../../src/agent/report'
import { decodeControl, encodeControl, encodeRuns, Msg, PROTOCOL_NAME } from '../../src/protocol/messages'
import { MigrationSource } from '../../src/agent/source/index'
import { makePair, pageBytes, type Pair, sameBytes, sourceOptions, startSource, touchAll } from './helpers/wire'
import type { MemoryTransport } from '../../src/testing/memory-transport'

/**
 * The first time `from` starts writing a frame of `type`, act() on the newest link (the source's ends of its urgent and
 * bulk connections; their peers are the destination's); its answer is onFrame's ('drop', 'cut'). fired: it happened.
 */
function onFirst(pair: Pair, from: 'source' | 'destination', type: number, act: (urgent: MemoryTransport, bulk: MemoryTransport) => 'drop' | 'cut' | undefined): { readonly fired: boolean } {
  const state = { fired: false }
  pair.onFrame = (f, t) => {
    if (state.fired || f !== from || t !== type) return undefined
    state.fired = true
    const [urgent, bulk] = pair.links.slice(-2)
    return act(urgent, bulk)
  }
  return state
}

/** One region of `pages` pages, every one holding data at the source. */
const filledPair = (pages: number) => makePair([pages], (src, regions) => {
  for (let p = 0; p < pages; p++) src.write(regions[0].id, p * 4096, pageBytes(0, p, 0))
})
const failure = (report: Promise<MigrationReport>) => report.then(() => undefined, (e: Error) => e)
/** Turns a wait for ever into a result the test can show (only a hang takes this long). */
const orHang = <T>(p: Promise<T>) => Promise.race([p, new Promise<'still waiting'>((r) => setTimeout(() => r('still waiting'), 8000))])

describe('a destination that breaks the protocol', () => {
  it('SETTLED without RESUMED before it: the source takes it for a broken link and asks, instead of waiting for ever with its memory held', async () => {
    const pair = filledPair(16)
    // pre-copy: the destination lacks nothing at the hand-off and settles as it resumes; its RESUMED goes missing
    pair.onFrame = (from, type) => (from === 'destination' && type === Msg.RESUMED ? 'drop' : undefined)
    const { source, report } = startSource(pair, { mode: 'precopy' })
    const outcome = await orHang(report.then((r) => r, (e: Error) => e))
    // it asked (one recovery): the destination's answer, settled with its resume time, ends the migration
    expect(outcome).toMatchObject({ postcopy: { recoveries: 1, pagesLocalAtDestination: 16 } })
    expect(source.phase).toBe('settled')
    expect(pair.events).toEqual(['restore', 'settled'])
    expect(pair.resumedOnSource).toBe(0)
  }, 20_000)

  it('a frame that breaks the protocol right after HANDOFF, before the destination read it: the source asks, hears NO_SESSION and resumes its service (it ran nowhere)', async () => {
    const pair = filledPair(16)
    const injected = onFirst(pair, 'source', Msg.HANDOFF, (urgent, bulk) => {
      // the destination reads bulk late (its HANDOFF waits), and says something on urgent that only bulk may carry:
      // the source's urgent channel answers ERROR, which the destination reads first, before the hand-off
      bulk.peer.pause()
      urgent.peer.write(Buffer.concat(encodeControl(Msg.SERVICE, { ports: [] })))
      setTimeout(() => bulk.peer.resume(), 50)
      return undefined
    })
    const { source, report } = startSource(pair, { mode: 'precopy' })
    const err = await orHang(failure(report))
    expect(injected.fired).toBe(true)
    // the destination never restored the service; the source learnt so and runs it again (before: ERR_MIGRATION_PROTOCOL,
    // the service paused here and never started there)
    expect(pair.events).not.toContain('restore')
    expect(err).toMatchObject({ code: 'ERR_MIGRATION_NO_SESSION' })
    expect(pair.resumedOnSource).toBe(1)
    expect(source.phase).toBe('failed')
  }, 20_000)

  it('a recovery whose answer comes mangled dials again: the destination never took the hand-off, and its NO_SESSION on the next try resumes the service here', async () => {
    const pair = filledPair(16)
    let lost = false, mangled = false
    pair.onFrame = (from, type) => {
      // HANDOFF is lost with a reset: the destination ends its session and listens again
      if (from === 'source' && type === Msg.HANDOFF && !lost) return (lost = true), 'cut'
      // the answer to the first RECOVER (its NO_SESSION) arrives as something else
      if (from === 'destination' && type === Msg.ERROR && lost && !mangled) {
        mangled = true
        const bulk = pair.links[pair.links.length - 1]
        setImmediate(() => bulk.peer.write(Buffer.concat(encodeControl(Msg.SYNC, {}))))
        return 'drop'
      }
      return undefined
    }
    const { report } = startSource(pair, { mode: 'precopy' })
    const err = await orHang(failure(report))
    expect([lost, mangled]).toEqual([true, true])
    // (before: the malformed answer ended the recovery, and the service stayed paused here, never started there)
    expect(err).toMatchObject({ code: 'ERR_MIGRATION_NO_SESSION' })
    expect(pair.resumedOnSource).toBe(1)
    expect(pair.events).not.toContain('restore')
    // three links: the first, the recovery whose answer was mangled, and the one that heard NO_SESSION
    expect(pair.links.length).toBe(6)
  }, 20_000)

  it('a recovery whose handshake answer comes mangled (another version, as a changed byte makes it) dials again: that destination passed the handshake before, and the migration settles', async () => {
    const pair = filledPair(64)
    let cut = false, mangled = false
    pair.onFrame = (from, type, on) => {
      // the service runs there; its RESUMED is lost with a reset
      if (from === 'destination' && type === Msg.RESUMED && !cut) return (cut = true), 'cut'
      // the first recovery's handshake: the destination's HELLO arrives saying another version
      if (from === 'destination' && type === Msg.HELLO && cut && !mangled) {
        mangled = true
        setImmediate(() => on.write(Buffer.concat(encodeControl(Msg.HELLO, { proto: PROTOCOL_NAME, version: 99, nonce: Buffer.alloc(32), proof: Buffer.alloc(32), key: Buffer.alloc(32), encrypt: false }))))
        return 'drop'
      }
      return undefined
    }
    const { source, report } = startSource(pair, { mode: 'postcopy' })
    const outcome = await orHang(report.then((r) => r, (e: Error) => e))
    expect([cut, mangled]).toEqual([true, true])
    // (before: ERR_MIGRATION_VERSION ended the recovery, the source failed with its memory kept, and the destination's
    // service lost its pages when its window ran out: the source-side fuzzer, memory seed 8, 3 of 6,215 sessions)
    expect(outcome).toMatchObject({ postcopy: { recoveries: 1, pagesLocalAtDestination: 64 } })
    expect(source.phase).toBe('settled')
    expect(sameBytes(pair)).toBeUndefined()
  }, 20_000)

  it('an ERROR without a code (a frame no destination sends) is a malformed frame, not the destination\'s report: the source recovers and the migration settles', async () => {
    const pair = filledPair(64)
    const injected = onFirst(pair, 'destination', Msg.RESUMED, (_urgent, bulk) => {
      // RESUMED arrives as an ERROR frame whose map names no code, as a changed type byte makes it
      setImmediate(() => bulk.peer.write(Buffer.concat(encodeControl(Msg.ERROR, { message: 'resumedAtMs' }))))
      return 'drop'
    })
    const { source, report } = startSource(pair, { mode: 'postcopy' })
    const outcome = await orHang(report.then((r) => r, (e: Error) => e))
    expect(injected.fired).toBe(true)
    // (before: taken for the destination's failure, the source failed with its memory kept while the service ran there)
    expect(outcome).toMatchObject({ postcopy: { recoveries: 1, pagesLocalAtDestination: 64 } })
    expect(source.phase).toBe('settled')
    expect(pair.events.filter((e) => e.startsWith('failed'))).toEqual([])
  }, 20_000)

  it('the destination gives up before the hand-off took effect there while HANDOFF is on its way: its ERROR says so, and the source resumes its service', async () => {
    const pair = filledPair(16)
    const crossed = onFirst(pair, 'source', Msg.HANDOFF, (_urgent, bulk) => {
      // the destination has not read HANDOFF (its bulk read waits) and gives up on the session for a reason of its
      // own, as its watchdog does: its ERROR, as a destination's channel sends it in pre-copy, then the link goes
      bulk.peer.pause()
      setImmediate(() => {
        const m = { code: 'ERR_MIGRATION_TIMEOUT', message: 'the source went quiet', serviceStarted: false }
        bulk.peer.write(Buffer.concat(encodeControl(Msg.ERROR, m)))
        setTimeout(() => bulk.cut(), 20)
      })
      return undefined
    })
    const { source, report } = startSource(pair, { mode: 'precopy' })
    const err = await orHang(failure(report))
    expect(crossed.fired).toBe(true)
    expect(pair.events).not.toContain('restore')
    // (before: the source, committed, kept its service paused: it ran nowhere)
    expect(err).toMatchObject({ code: 'ERR_MIGRATION_TIMEOUT', serviceStarted: false, message: expect.stringMatching(/\(the service resumed on the source\)$/) })
    expect(pair.resumedOnSource).toBe(1)
    expect(source.phase).toBe('failed')
  }, 20_000)

  it('a destination\'s ERROR before the hand-off took effect there says serviceStarted: false; after it, nothing', async () => {
    /** The ERROR the destination sends (on urgent, or bulk) when a frame no source sends comes on urgent, as `from` writes `type`. */
    async function errorWhen(mode: 'precopy' | 'postcopy', from: 'source' | 'destination', type: number, extra = {}): Promise<Record<string, unknown> | undefined> {
      const pair = filledPair(16)
      let said: Record<string, unknown> | undefined, done = false
      pair.onFrame = (f, t) => {
        if (done || f !== from || t !== type) return undefined
        done = true
        const [urgent, bulk] = pair.links.slice(-2)
        for (const t of [urgent, bulk]) {
          t.on('data', (chunk: Buffer) => {
            if (chunk[4] === Msg.ERROR) said ??= decodeControl(Msg.ERROR, chunk.subarray(5))
          })
        }
        urgent.write(Buffer.concat(encodeControl(Msg.SETTLED, {}))) // (a frame no source sends)
        return undefined
      }
      await orHang(failure(startSource(pair, { mode, extra }).report))
      return said
    }
    expect(await errorWhen('precopy', 'source', Msg.PRECOPY_END)).toMatchObject({ code: 'ERR_MIGRATION_PROTOCOL', serviceStarted: false })
    // (after the hand-off a refusal is told only where it ends the migration: with recovery off, here)
    const after = await errorWhen('postcopy', 'destination', Msg.RESUMED, { recoveryTimeoutMs: 0 })
    expect(after).toMatchObject({ code: 'ERR_MIGRATION_PROTOCOL' })
    expect(after).not.toHaveProperty('serviceStarted')
  }, 20_000)

  it('a frame that breaks the protocol after the destination took the hand-off, before its RESUMED arrived: the destination is not told, both recover, and the migration settles with every page', async () => {
    const pair = filledPair(64)
    const injected = onFirst(pair, 'destination', Msg.RESUMED, (urgent) => {
      // the service runs there; before its RESUMED, a frame only bulk may carry arrives on urgent
      urgent.peer.write(Buffer.concat(encodeControl(Msg.SERVICE, { ports: [] })))
      return 'drop'
    })
    const { source, report } = startSource(pair, { mode: 'postcopy' })
    await touchAll(pair)
    const outcome = await orHang(report.then((r) => r, (e: Error) => e))
    expect(injected.fired).toBe(true)
    // (before: this side's ERROR failed the destination, whose service had started, and the source dialled a
    // destination that had stopped listening until its recovery timeout, then failed with its memory kept)
    expect(outcome).toMatchObject({ postcopy: { recoveries: 1 } })
    expect(source.phase).toBe('settled')
    expect(pair.events.filter((e) => e.startsWith('failed'))).toEqual([])
    expect(pair.resumedOnSource).toBe(0)
  }, 20_000)

  it('a PAGE_REQUEST of a kind no destination sends is refused at once, not echoed back in a REQUEST_DONE that fails the destination: once, a broken link, recovered', async () => {
    const pair = filledPair(4096) // (the push outlasts the request: settled first, there is no link left to recover)
    const injected = onFirst(pair, 'destination', Msg.RESUMED, (urgent) => {
      // after RESUMED (the service runs there): a request of kind 7 for page 0
      setImmediate(() => urgent.peer.write(encodeRuns(Msg.PAGE_REQUEST, 7, 0, [0, 1])))
      return undefined
    })
    const { source, report } = startSource(pair, { mode: 'postcopy' })
    const outcome = await orHang(report.then((r) => r, (e: Error) => e))
    expect(injected.fired).toBe(true)
    // (a byte TCP's checksum missed looks the same: before, it ended the migration there, the service lost with it)
    expect(outcome).toMatchObject({ postcopy: { recoveries: 1, protocolBreaks: 1, pagesLocalAtDestination: 4096 } })
    expect(source.phase).toBe('settled')
    expect(pair.events.filter((e) => e.startsWith('failed'))).toEqual([])
    expect(sameBytes(pair)).toBeUndefined()
  }, 20_000)

  it('a destination that repeats a malformed request on every link: three recoveries, then the source refuses it and the migration ends', async () => {
    const pair = filledPair(4096) // (the push outlasts the request: settled first, there is no link left to recover)
    let sent = 0
    pair.onFrame = (from, type) => {
      // on the first link once the service runs there, and on each recovery's link once it said what it holds
      if (from !== 'destination' || (type !== Msg.RESUMED && type !== Msg.RECOVER_STATE)) return undefined
      const [urgent] = pair.links.slice(-2)
      setImmediate(() => (sent++, urgent.peer.write(encodeRuns(Msg.PAGE_REQUEST, 7, 0, [0, 1]))))
      return undefined
    }
    const { report } = startSource(pair, { mode: 'postcopy', extra: { recoveryTimeoutMs: 5000 } })
    const err = await orHang(failure(report))
    // the budget (broken-link.ts): the fourth is this side's own refusal, told, and the destination fails on it
    expect(sent).toBe(4)
    expect(err).toMatchObject({ code: 'ERR_MIGRATION_PROTOCOL', message: expect.stringMatching(/^expected a PAGE_REQUEST of kind 0 \(ready\) or 1 \(fault\), got 7.*keeps its memory/) })
    expect(await pair.destFailed).toMatchObject({ code: 'ERR_MIGRATION_PROTOCOL', fromPeer: true })
  }, 20_000)

  it('a destination whose service is slow to start (no RESUMED yet) and that breaks the protocol on every link: past the first recovery the budget holds, and the source ends', async () => {
    const pair = filledPair(64)
    pair.restoreGate = new Promise(() => {}) // its service never resumes: no RESUMED, and RECOVER_STATE without a resume time
    let sent = 0
    pair.onFrame = (from, type) => {
      // a frame only bulk may carry, on urgent: once HANDOFF went, and on each recovery's link once it said what it holds
      if (!((from === 'source' && type === Msg.HANDOFF) || (from === 'destination' && type === Msg.RECOVER_STATE))) return undefined
      const [urgent] = pair.links.slice(-2)
      setTimeout(() => (sent++, urgent.peer.write(Buffer.concat(encodeControl(Msg.SERVICE, { ports: [] })))), 5)
      return undefined
    }
    const { report } = startSource(pair, { mode: 'postcopy', extra: { recoveryTimeoutMs: 5000 } })
    const err = await orHang(failure(report))
    // (before: while RESUMED had not come every protocol break was recovered, link after link, until the recovery's
    // deadline ended it as a broken link)
    expect(err).toMatchObject({ code: 'ERR_MIGRATION_PROTOCOL', message: expect.stringMatching(/keeps its memory/) })
    expect(sent).toBe(4)
    expect(pair.resumedOnSource).toBe(0) // (the hand-off took effect there: its service is starting)
  }, 20_000)

  it('a failure of the source\'s own right after HANDOFF, which the destination has not read yet: it asks whether the hand-off arrived, and the service runs on exactly one host', async () => {
    const pair = filledPair(16)
    // the destination reads bulk late: HANDOFF waits there while the source fails of its own accord
    const held = onFirst(pair, 'source', Msg.HANDOFF, (_urgent, bulk) => {
      bulk.peer.pause()
      setTimeout(() => bulk.peer.resume(), 50)
      return undefined
    })
    let resumed = 0
    const source = new MigrationSource(pair.src, pair.srcRegions, sourceOptions(pair, 'postcopy'), {
      pause: async () => ({ state: new Uint8Array([1, 2, 3]) }),
      resume: () => void resumed++,
      progress: () => {},
      takeFreed: () => [],
      postcopy: () => {
        throw new Error('a bug of the source\'s own, right after HANDOFF went')
      },
    })
    const err = await orHang(source.run().then(() => undefined, (e: Error) => e))
    expect(held.fired).toBe(true)
    expect(err).toBeInstanceOf(Error)
    const restored = pair.events.includes('restore')
    // exactly one host: restored there (and this side keeps its memory), or resumed here (before: neither, when the
    // ERROR told on urgent reached the destination before HANDOFF on bulk and it ended its session)
    expect({ restored, resumed }).toEqual(restored ? { restored: true, resumed: 0 } : { restored: false, resumed: 1 })
  }, 20_000)

  it('an ERROR saying the service did not start there, after RESUMED said it runs there: the source does not resume it too, it keeps its memory', async () => {
    const pair = filledPair(16)
    const contradicted = onFirst(pair, 'destination', Msg.RESUMED, (_urgent, bulk) => {
      setImmediate(() => bulk.peer.write(Buffer.concat(encodeControl(Msg.ERROR, { code: 'ERR_MIGRATION_HANDOFF', message: 'could not restore', serviceStarted: false }))))
      return undefined
    })
    const { source, report } = startSource(pair, { mode: 'postcopy' })
    const err = await orHang(failure(report))
    expect(contradicted.fired).toBe(true)
    expect(pair.events).toContain('restore')
    // (before: the ERROR moved the source to resume its service as well: it ran on both hosts)
    expect(err).toMatchObject({ code: 'ERR_MIGRATION_HANDOFF', afterHandoff: true, message: expect.stringMatching(/the source keeps its memory until the destination settles\)$/) })
    expect(pair.resumedOnSource).toBe(0)
    expect(source.fate.state).toBe('there')
  }, 20_000)
})
