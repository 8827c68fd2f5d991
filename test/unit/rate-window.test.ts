/** The progress line's send rate (src/agent/source/rate-window.ts). */
import { describe, expect, it } from 'vitest'
import { RateWindow } from '../../src/agent/source/rate-window'

describe('the send rate between progress ticks', () => {
  it('is bytes per second since the previous sample; a tick on the same clock reading keeps the last rate', () => {
    const w = new RateWindow()
    expect(w.sample(1000, 0)).toBe(0) // (nothing to compare with yet)
    expect(w.sample(1200, 2 << 20)).toBe(10 << 20)
    expect(w.sample(1200, 3 << 20)).toBe(10 << 20) // (no time passed: not Infinity)
    expect(w.sample(1400, 3 << 20)).toBe(0)
  })
})
