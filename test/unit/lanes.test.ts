import { describe, expect, it } from 'vitest'
import { LANE_CHUNK_PAGES, laneOf, splitByLane } from '../../src/agent/source/lanes'

describe('bulk stream lanes', () => {
  it('puts every page of a run on the lane of its 2 MiB chunk, each page exactly once, in order within a lane', () => {
    const runs = [0, 1, 100, 1000, 1500, 2, 3000, 5000, 9000, 511]
    for (const lanes of [1, 2, 3, 4]) {
      const split = splitByLane(runs, lanes)
      const seen: number[] = []
      split.forEach((list, lane) => {
        let last = -1
        for (let k = 0; k < list.length; k += 2) {
          expect(list[k]).toBeGreaterThan(last) // order kept
          for (let p = list[k]; p < list[k] + list[k + 1]; p++) {
            expect(laneOf(p, lanes)).toBe(lane)
            seen.push(p)
          }
          last = list[k] + list[k + 1] - 1
        }
      })
      const want: number[] = []
      for (let k = 0; k < runs.length; k += 2) for (let p = runs[k]; p < runs[k] + runs[k + 1]; p++) want.push(p)
      expect(seen.sort((a, b) => a - b)).toEqual(want)
    }
  })

  it('keeps a run whole on one lane, and cuts it at chunk boundaries otherwise', () => {
    expect(splitByLane([10, 20], 2)).toEqual([[10, 20], []])
    expect(splitByLane([LANE_CHUNK_PAGES - 2, 4], 2)).toEqual([[LANE_CHUNK_PAGES - 2, 2], [LANE_CHUNK_PAGES, 2]])
    // one lane: runs that touch merge across chunk boundaries
    expect(splitByLane([0, 3 * LANE_CHUNK_PAGES], 1)).toEqual([[0, 3 * LANE_CHUNK_PAGES]])
    expect(splitByLane([0, 3 * LANE_CHUNK_PAGES], 2)).toEqual([[0, LANE_CHUNK_PAGES, 2 * LANE_CHUNK_PAGES, LANE_CHUNK_PAGES], [LANE_CHUNK_PAGES, LANE_CHUNK_PAGES]])
  })
})
