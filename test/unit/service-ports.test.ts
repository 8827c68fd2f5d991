// Where the source's forwarder relays the moved service's clients: the host (serviceHost, or the host of `to`) and
// the ports the destination announces in SERVICE, also when the link broke before SERVICE came (after SETTLED).
import { describe, expect, it } from 'vitest'
import { ServicePorts } from '../../src/agent/source/service-ports'
import type { Channel } from '../../src/protocol/channel'
import type { Frame } from '../../src/protocol/frames'
import { encodeControl, Msg } from '../../src/protocol/messages'
import { validateMigrateOptions } from '../../src/options'
import { FakeClock } from '../../src/testing/fake-clock'

const token = 'x'.repeat(32)
const frame = (type: Msg, body: Record<string, unknown>): Frame => {
  const [head, payload] = encodeControl(type, body)
  return { type: head[4], payload }
}

/** A bulk connection of a redial that answers RECOVER with these frames, then nothing (until it is failed); what was sent on it. */
function fakeBulk(answers: Frame[]) {
  const sent: number[] = []
  let fail: (err: Error) => void = () => {}
  const bulk = {
    send: (parts: Uint8Array[]) => void sent.push(parts[0][4]),
    nextFrame: () => (answers.length ? Promise.resolve(answers.shift()!) : new Promise<Frame>((_, reject) => (fail = reject))),
    fail: (err: Error) => fail(err),
  } as unknown as Channel
  return { bulk, sent }
}

/** Lets the promise chains run (the fake clock fires timers only when advanced). */
const settle = () => new Promise<void>((r) => setImmediate(r))

describe('serviceHost', () => {
  it('is a host name or an IP address, without a port', () => {
    expect(validateMigrateOptions({ to: '10.0.1.2:7000', serviceHost: '192.168.5.2' }, token).serviceHost).toBe('192.168.5.2')
    expect(validateMigrateOptions({ to: '10.0.1.2:7000', serviceHost: 'svc-b.internal' }, token).serviceHost).toBe('svc-b.internal')
    expect(validateMigrateOptions({ to: '10.0.1.2:7000', serviceHost: 'fd00::2' }, token).serviceHost).toBe('fd00::2')
    expect(validateMigrateOptions({ to: '10.0.1.2:7000' }, token).serviceHost).toBeUndefined()
    for (const bad of ['192.168.5.2:8080', '', 'a b', 42]) {
      expect(() => validateMigrateOptions({ to: '10.0.1.2:7000', serviceHost: bad as string }, token)).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG', message: expect.stringMatching(/^expected serviceHost to be a host name or an IP address \(no port/) }))
    }
  })
})

describe('ServicePorts', () => {
  it('hands the forwarder the host it was given and the announced ports', async () => {
    const seen: [string, (number | null)[]][] = []
    const ports = new ServicePorts('192.168.5.2', (host, p) => seen.push([host, p]))
    ports.onService(frame(Msg.SERVICE, { ports: [8080, null] }))
    await ports.wait(10_000) // known: at once
    expect(seen).toEqual([['192.168.5.2', [8080, null]]])
  })

  it('the link broke before SERVICE came: it dials in again, sends RECOVER, and takes the ports that follow RECOVER_STATE', async () => {
    const seen: [string, (number | null)[]][] = []
    const ports = new ServicePorts('10.0.1.2', (host, p) => seen.push([host, p]))
    const { bulk, sent } = fakeBulk([frame(Msg.RECOVER_STATE, { settled: {} }), frame(Msg.SERVICE, { ports: [9000] })])
    let dialled = 0, closed = 0
    await ports.wait(10_000, Promise.resolve(), async () => (dialled++, { bulk, close: () => void closed++ }))
    expect(seen).toEqual([['10.0.1.2', [9000]]])
    expect([dialled, closed, sent]).toEqual([1, 1, [Msg.RECOVER]])
  })

  it('a redial that fails is tried again until the ports come or the wait is over', async () => {
    const seen: (number | null)[][] = []
    const ports = new ServicePorts('10.0.1.2', (_h, p) => seen.push(p))
    let dialled = 0
    const redial = async () => {
      if (++dialled < 3) throw new Error('ECONNREFUSED')
      return { bulk: fakeBulk([frame(Msg.RECOVER_STATE, {}), frame(Msg.SERVICE, { ports: [9001] })]).bulk, close: () => {} }
    }
    await ports.wait(10_000, Promise.resolve(), redial)
    expect([dialled, seen]).toEqual([3, [[9001]]])
    // nothing comes and the link stays up: the wait ends after its time, without ports
    const none: unknown[] = []
    const t0 = Date.now()
    await new ServicePorts('h', (...a) => none.push(a)).wait(200, new Promise(() => {}), redial)
    expect(Date.now() - t0).toBeGreaterThanOrEqual(150)
    expect(none).toEqual([])
  })

  it('runs on the injected clock, a redial unanswered for linkTimeoutMs is dropped and dialled again, and no timer is left', async () => {
    const clock = new FakeClock()
    const seen: (number | null)[][] = []
    const ports = new ServicePorts('10.0.1.2', (_h, p) => seen.push(p), clock, 500)
    const dials: { closed: boolean; sent: number[] }[] = []
    const redial = async () => {
      // the first destination link is stopped after its handshake; the second answers
      const { bulk, sent } = fakeBulk(dials.length === 0 ? [] : [frame(Msg.RECOVER_STATE, { settled: {} }), frame(Msg.SERVICE, { ports: [9002] })])
      const d = { closed: false, sent }
      dials.push(d)
      return { bulk, close: () => void (d.closed = true) }
    }
    const done = ports.wait(10_000, Promise.resolve(), redial)
    await settle()
    expect(dials.map((d) => d.sent)).toEqual([[Msg.RECOVER]])
    clock.advance(499)
    await settle()
    expect(dials).toHaveLength(1) // still waiting for RECOVER_STATE
    clock.advance(1) // linkTimeoutMs: that link counts as broken
    await settle()
    expect(dials[0].closed).toBe(true)
    clock.advance(100) // the pause between redials
    await settle()
    await done
    expect(dials.map((d) => [d.closed, d.sent])).toEqual([[true, [Msg.RECOVER]], [true, [Msg.RECOVER]]])
    expect(seen).toEqual([[9002]])
    expect(clock.pendingTimers).toBe(0)
  })

  it('with nothing coming, the wait ends when the injected clock reaches its end, not before', async () => {
    const clock = new FakeClock()
    let ended = false
    const done = new ServicePorts('h', undefined, clock).wait(2_000, new Promise(() => {})).then(() => (ended = true))
    clock.advance(1_999)
    await settle()
    expect(ended).toBe(false)
    clock.advance(1)
    await settle() // at once on the fake clock (it used real time: 2 s later)
    expect([ended, clock.pendingTimers]).toEqual([true, 0])
    await done
  })
})
