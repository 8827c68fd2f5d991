import { afterEach, describe, expect, it } from 'vitest'
import { DEFAULT_POSTCOPY_NICE, peerPostcopyNice, resolvePostcopyNice, Yielding } from '../../src/agent/yielding'
import { validateMigrateOptions } from '../../src/options'

/** A thread whose nice value the kernel sets: `refuseBelow` plays a kernel without CAP_SYS_NICE (it cannot go back down). */
function thread(start: number, refuseBelow = -Infinity) {
  const t = {
    nice: start,
    calls: [] as number[],
    set(n: number) {
      t.calls.push(n)
      if (n < t.nice && n < refuseBelow) throw Object.assign(new Error('setpriority: EACCES'), { code: 'EACCES' })
      t.nice = n
    },
  }
  return t
}

describe('post-copy yields the CPU to the service (Yielding)', () => {
  afterEach(() => {
    delete process.env.UFFD_MIGRATE_POSTCOPY_NICE
  })

  it('from the hand-off the agent thread runs at postcopyNice, and returns to its own once settled', () => {
    const own = thread(0)
    const y = new Yielding((n) => own.set(n), 0)
    y.enter(10)
    expect([own.nice, y.nice]).toEqual([10, 10])
    expect(y.leave()).toBe(true)
    expect([own.nice, y.nice]).toEqual([0, 0])
  })

  it('never lowers a nice value: 0, or one not above the agent own, changes nothing', () => {
    const own = thread(12)
    const y = new Yielding((n) => own.set(n), 12)
    y.enter(0)
    y.enter(12)
    expect(own.calls).toEqual([])
    expect(y.leave()).toBe(true)
    expect(own.calls).toEqual([])
  })

  it('where the kernel refuses to lower it again, leave() says so and the thread stays yielded', () => {
    const own = thread(0, 10)
    const y = new Yielding((n) => own.set(n), 0)
    y.enter(15)
    expect(y.leave()).toBe(false)
    expect([own.nice, y.nice]).toEqual([15, 15])
    y.enter(15) // the next post-copy: already there, not set again
    expect(own.calls).toEqual([15, 0])
  })

  it('resolves the option (explicit, environment, default) and refuses what is not a nice value with a stable code', () => {
    expect(resolvePostcopyNice()).toBe(DEFAULT_POSTCOPY_NICE)
    expect(resolvePostcopyNice(0)).toBe(0)
    expect(resolvePostcopyNice('7')).toBe(7)
    process.env.UFFD_MIGRATE_POSTCOPY_NICE = '3'
    expect(resolvePostcopyNice()).toBe(3)
    expect(validateMigrateOptions({ to: '127.0.0.1:1', token: 'x'.repeat(16) }, undefined).postcopyNice).toBe(3)
    process.env.UFFD_MIGRATE_POSTCOPY_NICE = 'high'
    expect(() => resolvePostcopyNice()).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG', message: expect.stringContaining('UFFD_MIGRATE_POSTCOPY_NICE') }))
    for (const bad of [-1, 20, 2.5]) {
      expect(() => validateMigrateOptions({ to: '127.0.0.1:1', token: 'x'.repeat(16), postcopyNice: bad }, undefined)).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG', message: expect.stringContaining('options.postcopyNice') }))
    }
  })

  it('takes from a peer only an integer 0..19 (anything else: no yielding)', () => {
    expect([5, 0, 19].map(peerPostcopyNice)).toEqual([5, 0, 19])
    expect([-3, 20, 1.5, '10', null, undefined].map(peerPostcopyNice)).toEqual([0, 0, 0, 0, 0, 0])
  })
})

describe('Yielding waits for the forwarded clients route', () => {
  it('with clients forwarded, enters once their route is set up (in either order), and not again after leave()', () => {
    const own = thread(0)
    const y = new Yielding((n) => own.set(n), 0)
    y.enterWhen(true, 10)
    expect(own.nice).toBe(0) // SERVICE has not crossed yet
    y.clientsRouted()
    expect(own.nice).toBe(10)
    y.clientsRouted()
    expect(own.calls).toEqual([10])
    expect(y.leave()).toBe(true)
    // the next migration: the route came first, then the hand-off's enter does not wait
    y.clientsRouted()
    y.enterWhen(true, 10)
    expect(own.nice).toBe(10)
    expect(y.leave()).toBe(true)
    // without forwarded clients it enters at once; a leave() before the route drops the waiting enter
    y.enterWhen(false, 5)
    expect(own.nice).toBe(5)
    y.leave()
    y.enterWhen(true, 10)
    y.leave()
    y.clientsRouted()
    expect(own.nice).toBe(0)
  })

  it('forgets a route set up after an earlier migration when the next one begins', () => {
    const own = thread(0)
    const y = new Yielding((n) => own.set(n), 0)
    y.enterWhen(true, 10)
    y.clientsRouted()
    y.leave()
    y.clientsRouted() // late: the earlier migration is over
    y.begin()
    y.enterWhen(true, 10)
    expect(own.nice).toBe(0) // waits for this migration's route
    y.clientsRouted()
    expect(own.nice).toBe(10)
  })
})
