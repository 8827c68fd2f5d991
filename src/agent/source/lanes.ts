/**
 * Parallel bulk streams ("lanes", the `streams` option): every frame about a
 * page (its data, a zero/free/stale range) travels on the lane of its 2 MiB
 * chunk, so each lane carries a page's frames in the order they were sent
 * and "an older version never overwrites a newer one" holds per page by
 * construction, whatever the lanes' relative speed. Frames that change the
 * rules for every page (HANDOFF, the SYNC of a drop pass) go on lane 0 after
 * a barrier: a SYNC answered on every other lane. Pure maths here.
 */

/** Pages that always travel together: 2 MiB of 4 KiB pages (a THP extent). */
export const LANE_CHUNK_PAGES = 512

export function laneOf(page: number, lanes: number): number {
  return Math.floor(page / LANE_CHUNK_PAGES) % lanes
}

/** Splits (first, count) pairs into one list of pairs per lane, cutting runs at chunk boundaries (order kept within a lane). */
export function splitByLane(runs: ArrayLike<number>, lanes: number): number[][] {
  const out: number[][] = Array.from({ length: lanes }, () => [])
  for (let k = 0; k + 1 < runs.length; k += 2) {
    const end = runs[k] + runs[k + 1]
    for (let p = runs[k]; p < end;) {
      const q = Math.min(end, (Math.floor(p / LANE_CHUNK_PAGES) + 1) * LANE_CHUNK_PAGES)
      const lane = out[laneOf(p, lanes)]
      // a run continuing the lane's last one (a run cut by a chunk of another lane never is) stays one run
      if (lane.length && lane[lane.length - 2] + lane[lane.length - 1] === p) lane[lane.length - 1] += q - p
      else lane.push(p, q - p)
      p = q
    }
  }
  return out
}
