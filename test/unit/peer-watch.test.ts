// A destination that stops (SIGSTOP, a wedged loop) keeps its kernel answering, so only the quiet of the link tells:
// the source's PeerWatch (src/agent/source/peer-watch.ts) and the destination's KEEPALIVE that keeps a live one loud.
import { describe, expect, it } from 'vitest'
import { PeerWatch } from '../../src/agent/source/peer-watch'
import { DestPhase } from '../../src/agent/destination/machine'
import type { UffdMigrateError } from '../../src/errors'
import { reply } from '../../src/agent/source/link'
import { Channel } from '../../src/protocol/channel'
import { decodeControl, encodeControl, Msg } from '../../src/protocol/messages'
import { MemoryTransport } from '../../src/testing/memory-transport'
import { FakeClock } from '../../src/testing/fake-clock'
import { drive, turns } from './helpers/raw-source'

function watched(linkTimeoutMs: number) {
  const clock = new FakeClock()
  let bytes = 0
  const stuck: UffdMigrateError[] = []
  const watch = new PeerWatch(clock, linkTimeoutMs, () => bytes, (e) => stuck.push(e))
  return { clock, watch, stuck, read: (n: number) => void (bytes += n) }
}

describe('PeerWatch (the source)', () => {
  it('nothing read for linkTimeoutMs: one CONNECTION error that says what it saw; then no timer is left', () => {
    const w = watched(2000)
    w.watch.start()
    w.clock.advance(1999)
    expect(w.stuck).toEqual([])
    w.clock.advance(400) // the next check (every 400 ms: a fifth of it)
    expect(w.stuck.map((e) => e.code)).toEqual(['ERR_MIGRATION_CONNECTION'])
    expect(w.stuck[0].message).toMatch(/^the destination looks stuck: nothing arrived from it for 2\d{3} ms \(linkTimeoutMs 2000; a live destination sends KEEPALIVE\)/)
    w.clock.advance(10_000)
    expect([w.stuck.length, w.clock.pendingTimers]).toEqual([1, 0])
  })

  it('a byte now and then (a KEEPALIVE every linkTimeoutMs / 4) keeps it quiet for as long as it comes', () => {
    const w = watched(2000)
    w.watch.start()
    for (let t = 0; t < 60_000; t += 500) {
      w.read(5)
      w.clock.advance(500)
    }
    expect(w.stuck).toEqual([])
    w.clock.advance(2400)
    expect(w.stuck).toHaveLength(1)
  })

  it('a check that runs late (this loop was busy, bytes may wait unread) counts the quiet from then', () => {
    const w = watched(2000)
    w.watch.start()
    w.clock.advance(300)
    w.clock.jump(5000) // the loop blocked for 5 s
    w.clock.advance(100) // the late check runs as the jump ends: the quiet counts from it
    expect(w.stuck).toEqual([])
    w.clock.advance(1800) // 1900 ms after that check: still not linkTimeoutMs
    expect(w.stuck).toEqual([])
    w.clock.advance(400)
    expect(w.stuck).toHaveLength(1)
  })

  it('stop() (settled, or the link closed) ends it; linkTimeoutMs 0 never watches', () => {
    const w = watched(2000)
    w.watch.start()
    w.clock.advance(1000)
    w.watch.stop()
    w.clock.advance(10_000)
    expect([w.stuck.length, w.clock.pendingTimers]).toEqual([0, 0])
    const off = watched(0)
    off.watch.start()
    expect(off.clock.pendingTimers).toBe(0)
  })
})

describe('KEEPALIVE from the destination', () => {
  /** KEEPALIVE frames the raw source reads on urgent while the clock moves ms on, in 100 ms steps (it sends its own each second). */
  async function keepalivesOver(d: Awaited<ReturnType<typeof drive>>, clock: FakeClock, ms: number): Promise<number> {
    let n = 0
    d.urgent.onFrame((f) => void (f.type === Msg.KEEPALIVE && n++))
    for (let t = 0; t < ms; t += 100) {
      if (t % 1000 === 0) d.urgent.send(encodeControl(Msg.KEEPALIVE, {}))
      clock.advance(100)
      await turns(2)
    }
    return n
  }

  it('every linkTimeoutMs / 4 in pre-copy and post-copy', async () => {
    for (const phase of [DestPhase.PRECOPY, DestPhase.POSTCOPY]) {
      const clock = new FakeClock()
      const d = await drive(phase, { clock, regions: { linkTimeoutMs: 4000 } })
      const n = await keepalivesOver(d, clock, 8000)
      expect([d.dest.phase, n >= 7 && n <= 9]).toEqual([phase, true])
    }
  })

  it('none once settled (a settled destination is quiet), none with linkTimeoutMs 0', async () => {
    const clock = new FakeClock()
    const settled = await drive(DestPhase.SETTLED, { clock, regions: { linkTimeoutMs: 4000 } })
    expect(settled.dest.phase).toBe(DestPhase.SETTLED)
    expect(await keepalivesOver(settled, clock, 8000)).toBe(0)
    const clock2 = new FakeClock()
    const off = await drive(DestPhase.POSTCOPY, { clock: clock2, regions: { linkTimeoutMs: 0 } })
    expect(await keepalivesOver(off, clock2, 8000)).toBe(0)
  })
})

describe('an awaited reply on the source', () => {
  it('is never a KEEPALIVE: one that comes first (the destination sends them from REGIONS on) is passed over', async () => {
    const [a, b] = MemoryTransport.pair()
    const source = new Channel(a, 'urgent'), destination = new Channel(b, 'urgent')
    destination.send(encodeControl(Msg.KEEPALIVE, {}))
    destination.send(encodeControl(Msg.KEEPALIVE, {}))
    destination.send(encodeControl(Msg.CLOCK, { t0: 1, t1: 2 }))
    const f = await reply(source, Msg.CLOCK)
    expect([f.type, decodeControl(f.type, f.payload).t1]).toEqual([Msg.CLOCK, 2])
  })
})
