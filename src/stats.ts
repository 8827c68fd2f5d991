/** Percentiles over a growable sample buffer (fault latencies, round trips). */
export class Samples {
  private data = new Float64Array(1024)
  length = 0

  add(v: number): void {
    if (this.length === this.data.length) {
      const next = new Float64Array(this.data.length * 2)
      next.set(this.data)
      this.data = next
    }
    this.data[this.length++] = v
  }

  /** One set of samples out of several (for a summary over all of them). */
  static merged(...parts: Samples[]): Samples {
    const all = new Samples()
    all.data = new Float64Array(Math.max(1024, parts.reduce((n, p) => n + p.length, 0)))
    for (const p of parts) all.data.set(p.data.subarray(0, p.length), all.length), (all.length += p.length)
    return all
  }

  summary(): LatencySummary {
    if (this.length === 0) return { count: 0, p50: 0, p99: 0, max: 0, mean: 0 }
    const s = this.data.slice(0, this.length).sort()
    let sum = 0
    for (let i = 0; i < s.length; i++) sum += s[i]
    return { count: s.length, p50: pct(s, 50), p99: pct(s, 99), max: s[s.length - 1], mean: sum / s.length }
  }
}

export interface LatencySummary {
  count: number
  p50: number
  p99: number
  max: number
  mean: number
}

/** Nearest-rank percentile of a sorted array (as the limits' C programs do). */
export function pct(sorted: ArrayLike<number>, p: number): number {
  if (sorted.length === 0) return 0
  const idx = Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))
  return sorted[idx]
}

/**
 * CLOCK_MONOTONIC in milliseconds: one clock for every thread and process of
 * a host (performance.timeOrigin differs per thread). Across hosts the
 * source corrects with the offset measured at connect.
 */
export function nowMs(): number {
  return Number(process.hrtime.bigint()) / 1e6
}
