/**
 * free() during post-copy, as the destination's agent takes it: pages not here yet are marked received (and freed
 * here) and the source is told not to push them. They are zero-filled by the agent only when the service's thread
 * did not do it already (GuestRegion.free fills through the registry; `filled` says so).
 */
import { describe, expect, it } from 'vitest'
import type { NativeUffd } from '../../src/binding'
import { PageBitmap } from '../../src/bitmap'
import { Placement } from '../../src/agent/destination/placement'
import { Requests } from '../../src/agent/destination/requests'
import type { Clock } from '../../src/agent/clock'
import type { Region } from '../../src/region'

const PAGES = 64, PS = 4096

function destination() {
  const regions = [{ id: 5, pageCount: PAGES, sizeBytes: PAGES * PS } as unknown as Region]
  const received = [new PageBitmap(PAGES)]
  received[0].setRange(2, 2) // pages 2 and 3 are here already
  const clock = { now: () => 0, setTimeout: () => 0, clearTimeout: () => {}, setImmediate: (fn: () => void) => fn() } as unknown as Clock
  const zeroFilled: [number, number, number][] = [], told: [number, number[]][] = []
  const uffd = { zeropage: (id: number, off: number, len: number) => (zeroFilled.push([id, off, len]), 0) } as unknown as NativeUffd
  // eslint-disable-next-line prefer-const
  let requests: Requests
  const placement = new Placement(regions, received, PS, (region, first, count) => requests.arrived(region, first, count))
  placement.attach(uffd)
  requests = new Requests(regions, placement, PS, clock, { request: () => {}, ready: () => {}, freed: (region: number, runs: number[]) => told.push([region, [...runs]]) } as never)
  return { placement, requests, received, zeroFilled, told }
}

describe('free() on the destination in post-copy', () => {
  it('filled by the service: the agent places nothing, marks the missing pages received and freed, and tells the source', () => {
    const { placement, requests, received, zeroFilled, told } = destination()
    expect(placement.pagesLeft).toBe(PAGES - 2) // counted from the maps it was given
    requests.free(0, 0, 8, true)
    expect(zeroFilled).toEqual([])
    expect(received[0].allSet(0, 8)).toBe(true)
    expect([placement.freedHere[0].has(1), placement.freedHere[0].has(2), placement.freedHere[0].has(4)]).toEqual([true, false, true])
    expect(told).toEqual([[0, [0, 2, 4, 4]]]) // only what was missing
    expect(placement.pagesLeft).toBe(PAGES - 8)
  })

  it('not filled (the fill failed, or a binding without it): the agent zero-fills each missing run itself', () => {
    const { placement, requests, zeroFilled, told } = destination()
    requests.free(0, 0, 8, false)
    expect(zeroFilled).toEqual([[5, 0, 2 * PS], [5, 4 * PS, 4 * PS]])
    expect(told).toEqual([[0, [0, 2, 4, 4]]])
    expect(placement.pagesLeft).toBe(PAGES - 8)
    requests.free(0, 0, 8, false) // all here now: nothing placed or told again
    expect(zeroFilled.length).toBe(2)
    expect(told.length).toBe(1)
  })
})
