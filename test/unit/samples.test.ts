// Samples.merged(): the report's overall fault latency is the union of the
// per-path samples, so it must summarize exactly as one set holding them all.
import { describe, expect, it } from 'vitest'
import { Samples } from '../../src/stats'

describe('Samples.merged', () => {
  it('summarizes like one set that got every sample, whatever the parts and their sizes', () => {
    let x = 7
    const next = () => ((x = (Math.imul(x, 1664525) + 1013904223) >>> 0) / 2 ** 32) * 5000
    const parts = [new Samples(), new Samples(), new Samples()]
    const all = new Samples()
    for (let i = 0; i < 3000; i++) {
      const v = next()
      parts[i % 7 === 0 ? 0 : i % 3 === 0 ? 1 : 2].add(v) // uneven parts, one past its first 1024-slot buffer
      all.add(v)
    }
    expect(Samples.merged(...parts).summary()).toEqual(all.summary())
    expect(Samples.merged(new Samples(), parts[0]).summary()).toEqual(parts[0].summary())
    expect(Samples.merged().summary().count).toBe(0)
  })
})
