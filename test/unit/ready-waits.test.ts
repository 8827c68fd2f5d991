/** ready() waits on the destination: answered once their whole range is here, whatever the order pages arrive in. */
import { describe, expect, it } from 'vitest'
import { PageBitmap } from '../../src/bitmap'
import { Requests } from '../../src/agent/destination/requests'
import type { Placement } from '../../src/agent/destination/placement'
import type { Region } from '../../src/region'
import type { Clock } from '../../src/agent/clock'

function setup(pages = 1000) {
  const received = [new PageBitmap(pages)]
  const placement = { received, knownZero: [new PageBitmap(pages)] } as unknown as Placement
  const clock = { now: () => 0, setTimeout: () => 0, clearTimeout: () => {}, setImmediate: (fn: () => void) => fn() } as unknown as Clock
  const answered: number[][] = []
  const sink = { request: () => {}, ready: (ids: number[]) => answered.push([...ids]), freed: () => {} }
  const requests = new Requests([{ id: 1, pageCount: pages } as unknown as Region], placement, 4096, clock, sink as never)
  /** What the placement does: mark the pages received, then report them. */
  const arrive = (first: number, count: number) => {
    received[0].setRange(first, count)
    requests.arrived(0, first, count)
  }
  return { requests, answered, arrive, received }
}

describe('ready() waits', () => {
  it('are answered once, when the last missing page of their range arrives, in any order', () => {
    const { requests, answered, arrive } = setup()
    requests.waitFor(1, 0, 10, 4, false) // 10..13
    requests.waitFor(2, 0, 12, 4, false) // 12..15
    requests.waitFor(3, 0, 500, 1, false)
    arrive(11, 2) // 11, 12: the first missing page of both is elsewhere
    expect(answered).toEqual([])
    arrive(13, 3) // 13..15: wait 2 is complete, wait 1 still lacks 10
    expect(answered).toEqual([[2]])
    arrive(0, 10) // 0..9 and then 10 itself
    expect(answered).toEqual([[2]])
    arrive(10, 1)
    expect(answered).toEqual([[2], [1]])
    arrive(10, 6) // arriving again wakes nothing twice
    expect(answered).toEqual([[2], [1]])
    requests.releaseAll()
    expect(answered).toEqual([[2], [1], [3]])
  })

  it('answers at once a wait whose range is already here, and wakes several waits of one page together', () => {
    const { requests, answered, arrive, received } = setup()
    received[0].setRange(0, 8)
    requests.waitFor(7, 0, 2, 4, false)
    expect(answered).toEqual([[7]])
    requests.waitFor(8, 0, 20, 1, false)
    requests.waitFor(9, 0, 19, 2, false)
    arrive(19, 2)
    expect(answered.length).toBe(2)
    expect(answered[1].sort()).toEqual([8, 9])
  })
})
