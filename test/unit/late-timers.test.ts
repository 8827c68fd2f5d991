// Timers that come due while this process cannot run (SIGSTOP, a frozen VM, a blocked loop) run before the I/O that
// arrived meanwhile is read. A deadline, or a stuck-peer check, that judged then took a peer that answered in time
// for a late one (seen: `npm run soak -- --stop source:4000` failed a handshake whose answer sat unread).
import { describe, expect, it } from 'vitest'
import { deadline, LATE_MS } from '../../src/deadline'
import { DestPhase } from '../../src/agent/destination/machine'
import { Watchdog } from '../../src/agent/destination/watchdog'
import type { Channel } from '../../src/protocol/channel'
import { FakeClock } from '../../src/testing/fake-clock'

describe('deadline()', () => {
  it('on time: expires once, after ms; cancelled first: never', () => {
    const clock = new FakeClock()
    let expired = 0
    deadline(clock, 3000, () => expired++)
    clock.advance(2999)
    expect(expired).toBe(0)
    clock.advance(1)
    expect(expired).toBe(1)
    const cancel = deadline(clock, 3000, () => expired++)
    clock.advance(2000)
    cancel()
    clock.advance(10_000)
    expect([expired, clock.pendingTimers]).toEqual([1, 0])
  })

  it('a timer that runs late (the process was stopped) gives the time it lost back, so an answer read meanwhile still counts', () => {
    const clock = new FakeClock()
    let expired = 0
    const cancel = deadline(clock, 3000, () => expired++)
    clock.advance(1000)
    clock.jump(4000) // stopped for 4 s: the timer is 2 s late when it runs
    clock.advance(0)
    expect(expired).toBe(0) // it used to expire here, before the answer that waited in the socket was read
    cancel() // the answer, read after the timers
    clock.advance(10_000)
    expect(expired).toBe(0)
    // nobody answers: it expires once the time it lost has passed too
    const clock2 = new FakeClock()
    let expired2 = 0
    deadline(clock2, 3000, () => expired2++)
    clock2.advance(1000)
    clock2.jump(4000)
    clock2.advance(1999)
    expect(expired2).toBe(0)
    clock2.advance(1)
    expect(expired2).toBe(1)
  })

  it('a little late (a busy loop, under LATE_MS) is on time', () => {
    const clock = new FakeClock()
    let expired = 0
    deadline(clock, 3000, () => expired++)
    clock.advance(2900)
    clock.jump(LATE_MS - 100)
    clock.advance(0)
    expect(expired).toBe(1)
  })
})

describe('the destination\'s watchdog after this process was stopped', () => {
  it('a late check does not judge: a source whose KEEPALIVE waited unread is not stuck', () => {
    const clock = new FakeClock()
    const ch = { bytesRead: 0, midFrame: false, name: 'urgent' } as unknown as Channel & { bytesRead: number }
    const broken: string[] = []
    const dog = new Watchdog(clock, {
      phase: () => DestPhase.PRECOPY, channels: () => [ch], oldestRequestSinceMs: () => undefined, complete: () => false,
      broken: (e) => broken.push(e.message), keepalive: () => {},
    })
    dog.start({ requestTimeoutMs: 0, linkTimeoutMs: 3000 })
    for (let t = 0; t < 2000; t += 100) clock.advance(100) // KEEPALIVE read at 0; then 2 s of quiet
    clock.jump(4000) // stopped 4 s: the source's KEEPALIVEs wait in the socket
    clock.advance(0) // the late check, before the read
    expect(broken).toEqual([])
    ch.bytesRead += 5 // read after the timers
    for (let t = 0; t < 1000; t += 100) clock.advance(100)
    expect(broken).toEqual([])
    // and a source that really went quiet is still caught
    for (let t = 0; t < 3500; t += 100) clock.advance(100)
    expect(broken).toHaveLength(1)
    expect(broken[0]).toMatch(/nothing arrived from the source for \d+ ms \(linkTimeoutMs 3000\)/)
    dog.stop()
  })
})
