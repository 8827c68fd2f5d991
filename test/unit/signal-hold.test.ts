/**
 * The source's hold on stop signals past the hand-off (src/signal-hold.ts), on a stand-in process: armed only once
 * the phase is past the hand-off, a first signal deferred until the migration ends and then raised again, a second
 * one raised at once, and nothing left listening afterwards.
 */
import { EventEmitter } from 'node:events'
import { describe, expect, it } from 'vitest'
import { HELD_SIGNALS, SAME_REQUEST_MS, type SignalTarget, SignalHold } from '../../src/signal-hold'

class FakeProcess extends EventEmitter implements SignalTarget {
  readonly pid = 4242
  /** The hold's clock: each signal below comes a second after the last unless a test says otherwise. */
  nowMs = 0
  override emit(event: string | symbol, ...args: unknown[]): boolean {
    this.nowMs += 1000
    return super.emit(event, ...args)
  }
  readonly raised: string[] = []
  kill(pid: number, sig: string): boolean {
    expect(pid).toBe(4242)
    this.raised.push(sig)
    return true
  }
}

const context = () => ({ guest: 'g', migration: 'm1', to: 'host-b:7070', phase: 'postcopy', pagesLeft: 1234 })
const listening = (p: FakeProcess) => HELD_SIGNALS.map((s) => p.listenerCount(s))

describe('the signal hold', () => {
  it('is armed from the service\'s pause: before it a stop signal keeps its usual meaning', () => {
    const p = new FakeProcess(), hold = new SignalHold(async () => {}, { target: p, finishAfterMs: 0, enabled: true, nowMs: () => p.nowMs })
    expect({ armed: hold.armed, listening: listening(p) }).toEqual({ armed: false, listening: [0, 0, 0] })
    hold.arm(context)
    hold.arm(context) // (once: a takeover's pause is the same one)
    expect({ armed: hold.armed, listening: listening(p) }).toEqual({ armed: true, listening: [1, 1, 1] })
  })

  it('UFFD_MIGRATE_HOLD_SIGNALS=0 (enabled false): never armed, signals keep their usual meaning', () => {
    const p = new FakeProcess(), hold = new SignalHold(async () => {}, { target: p, finishAfterMs: 0, enabled: false })
    hold.arm(context)
    expect({ armed: hold.armed, listening: listening(p) }).toEqual({ armed: false, listening: [0, 0, 0] })
  })

  it('defers a first signal until the migration ends, then raises it again once finished, with nothing of its own listening', async () => {
    const p = new FakeProcess(), order: string[] = []
    const hold = new SignalHold(async () => void order.push(`finished with ${p.raised.length} raised`), { target: p, finishAfterMs: 0, enabled: true, nowMs: () => p.nowMs })
    hold.arm(context)
    p.emit('SIGTERM')
    expect(p.raised).toEqual([])
    expect(hold.armed).toBe(true)
    hold.release()
    await new Promise((r) => setTimeout(r, 20))
    expect(order).toEqual(['finished with 0 raised']) // (the guest closed its control socket first: send read the report)
    expect(p.raised).toEqual(['SIGTERM'])
    expect(listening(p)).toEqual([0, 0, 0])
  })

  it('ends at once on a second signal', async () => {
    const p = new FakeProcess(), hold = new SignalHold(async () => {}, { target: p, finishAfterMs: 0, enabled: true, nowMs: () => p.nowMs })
    hold.arm(context)
    p.emit('SIGINT')
    p.emit('SIGTERM')
    expect(p.raised).toEqual(['SIGTERM'])
    expect({ armed: hold.armed, listening: listening(p) }).toEqual({ armed: false, listening: [0, 0, 0] })
    hold.release() // (the migration's end, later: nothing more)
    await new Promise((r) => setTimeout(r, 20))
    expect(p.raised).toEqual(['SIGTERM'])
  })

  it('a guest that exits by itself anyway (moved: once the clients it relays went idle) keeps holding until then', async () => {
    const p = new FakeProcess(), hold = new SignalHold(async () => {}, { target: p, finishAfterMs: 0, enabled: true, nowMs: () => p.nowMs })
    hold.arm(context)
    p.emit('SIGTERM')
    // (the migration ended, moved: the guest does not release the hold, its own exit honours the signal)
    await new Promise((r) => setTimeout(r, 20))
    expect({ raised: p.raised, listening: listening(p) }).toEqual({ raised: [], listening: [1, 1, 1] })
    p.emit('SIGINT') // (a second one, while it relays: at once)
    expect({ raised: p.raised, listening: listening(p) }).toEqual({ raised: ['SIGINT'], listening: [0, 0, 0] })
  })

  it('one request that arrives twice at once (Ctrl-C reaches a receive wrapper and its service, and the wrapper passes it on) is one signal, not a second', async () => {
    const p = new FakeProcess(), hold = new SignalHold(async () => {}, { target: p, finishAfterMs: 0, enabled: true, nowMs: () => p.nowMs })
    hold.arm(context)
    p.emit('SIGINT')
    p.nowMs -= 1000 - (SAME_REQUEST_MS - 1) // (the wrapper's, a moment later)
    p.emit('SIGINT')
    expect({ raised: p.raised, armed: hold.armed }).toEqual({ raised: [], armed: true })
    p.emit('SIGINT') // a second press, a second later: at once
    expect(p.raised).toEqual(['SIGINT'])
  })

  it('raises nothing when no signal came', async () => {
    const p = new FakeProcess(), hold = new SignalHold(async () => {}, { target: p, finishAfterMs: 0, enabled: true, nowMs: () => p.nowMs })
    hold.arm(context)
    hold.release()
    hold.release()
    await new Promise((r) => setTimeout(r, 20))
    expect({ raised: p.raised, listening: listening(p) }).toEqual({ raised: [], listening: [0, 0, 0] })
  })
})
