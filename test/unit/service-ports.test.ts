// Where the source's forwarder relays the moved service's clients: the host (serviceHost, or the host of `to`) and
// the ports the destination announces in SERVICE, also when the link broke before SERVICE came (after SETTLED).
import { describe, expect, it } from 'vitest'
import { ServicePorts } from '../../src/agent/source/service-ports'
import type { Channel } from '../../src/protocol/channel'
import type { Frame } from '../../src/protocol/frames'
import { encodeControl, Msg } from '../../src/protocol/messages'
import { validateMigrateOptions } from '../../src/options'

const token = 'x'.repeat(32)
const frame = (type: Msg, body: Record<string, unknown>): Frame => {
  const [head, payload] = encodeControl(type, body)
  return { type: head[4], payload }
}

/** A bulk connection of a redial that answers RECOVER with these frames; what was sent on it. */
function fakeBulk(answers: Frame[]) {
  const sent: number[] = []
  const bulk = {
    send: (parts: Uint8Array[]) => void sent.push(parts[0][4]),
    nextFrame: () => (answers.length ? Promise.resolve(answers.shift()!) : new Promise<Frame>(() => {})),
  } as unknown as Channel
  return { bulk, sent }
}

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
})
