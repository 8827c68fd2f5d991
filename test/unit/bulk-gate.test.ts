/** The bulk gate's two rules, on a fake clock. */
import { describe, expect, it } from 'vitest'
import { BulkGate, READY_PAUSE_MS } from '../../src/agent/destination/bulk-gate'
import { ErrorCode } from '../../src/errors'
import { RequestKind } from '../../src/protocol/messages'
import { FakeClock } from '../../src/testing/fake-clock'

function gate() {
  const clock = new FakeClock()
  const calls: boolean[] = []
  const g = new BulkGate(clock, (p) => calls.push(p))
  return { clock, calls, g }
}

describe('bulk gate', () => {
  it('reads freely while no request is open', () => {
    const { g, calls, clock } = gate()
    g.afterFrame()
    clock.turn()
    expect(calls).toEqual([])
    expect(g.isPaused).toBe(false)
  })

  it('fault rule: one bulk frame per turn of the loop while a fault is open', () => {
    const { g, calls, clock } = gate()
    g.opened(RequestKind.FAULT)
    expect(g.isPaused).toBe(false) // a fault alone does not stop the push
    g.afterFrame()
    expect(g.isPaused).toBe(true)
    g.afterFrame() // a second frame in the same turn does not stack
    clock.turn()
    expect(g.isPaused).toBe(false)
    g.afterFrame()
    expect(g.isPaused).toBe(true)
    g.done(RequestKind.FAULT)
    clock.turn()
    g.afterFrame()
    expect(g.isPaused).toBe(false)
    expect(calls).toEqual([true, false, true, false])
  })

  it('ready rule: paused for at most READY_PAUSE_MS, then runs as long, while ready() requests stay open', () => {
    const { g, clock } = gate()
    g.opened(RequestKind.READY)
    expect(g.isPaused).toBe(true)
    clock.advance(READY_PAUSE_MS - 1)
    expect(g.isPaused).toBe(true)
    clock.advance(1)
    expect(g.isPaused).toBe(false) // the hold-off: the push runs now
    g.opened(RequestKind.READY) // another ready() during the hold-off does not pause
    expect(g.isPaused).toBe(false)
    clock.advance(READY_PAUSE_MS)
    g.opened(RequestKind.READY) // after the hold-off it pauses again
    expect(g.isPaused).toBe(true)
    g.done(RequestKind.READY)
    g.done(RequestKind.READY)
    g.done(RequestKind.READY)
    expect(g.isPaused).toBe(false)
    expect(g.openRequests(RequestKind.READY)).toBe(0)
  })

  it('a ready() answered quickly releases the push at once', () => {
    const { g, clock } = gate()
    g.opened(RequestKind.READY)
    clock.advance(1)
    g.done(RequestKind.READY)
    expect(g.isPaused).toBe(false)
  })

  it('REQUEST_DONE without an open request is a protocol error', () => {
    const { g } = gate()
    expect(() => g.done(RequestKind.FAULT)).toThrow(expect.objectContaining({ code: ErrorCode.PROTOCOL }))
  })

  it('reset() (the link broke) forgets open requests and timers and reads again', () => {
    const { g, clock } = gate()
    g.opened(RequestKind.READY)
    g.opened(RequestKind.FAULT)
    expect(clock.pendingTimers).toBe(1)
    g.reset()
    expect(g.isPaused).toBe(false)
    expect(clock.pendingTimers).toBe(0)
    expect(g.openRequests(RequestKind.FAULT)).toBe(0)
    g.afterFrame()
    expect(g.isPaused).toBe(false)
  })
})
