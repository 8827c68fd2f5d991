/**
 * The kv-store example's table and allocator, on plain memory (pure JS): the
 * benchmark's "no wrong answers" rests on the store itself being right.
 */
import { createRequire } from 'node:module'
import { describe, expect, it } from 'vitest'

const require = createRequire(import.meta.url)
const { Store, valueFor } = require('../examples/kv-store/store.js')

/** A stand-in for a GuestRegion: free() zeroes like MADV_DONTNEED does. */
function memory(sizeBytes: number) {
  const buffer = new ArrayBuffer(sizeBytes)
  return { sizeBytes, buffer, free: (off: number, len: number) => new Uint8Array(buffer, off, len).fill(0) }
}

describe('kv-store example: Store', () => {
  it('keeps every key findable through random puts and deletes in a crowded table', () => {
    // 512 slots for up to 400 keys: long probe clusters that wrap around the end
    const store = new Store(memory(512 * 32), memory(256 * 64 * 1024))
    const keys = 400
    const model = new Int32Array(keys) // version, 0 = absent
    let seed = 12345
    const rnd = (n: number) => ((seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0) % n)
    let wrong = 0
    for (let step = 0; step < 30_000; step++) {
      const i = rnd(keys)
      const key = `k${i}`
      if (rnd(100) < 60) {
        model[i]++
        store.put(key, valueFor(key, model[i]), model[i])
      } else {
        expect(store.delete(key)).toBe(model[i] !== 0)
        model[i] = 0
      }
      if (step % 97 !== 0) continue
      for (let k = 0; k < keys; k++) {
        const v = store.version(`k${k}`)
        if (v !== model[k] || (v !== 0 && store.get(`k${k}`) !== valueFor(`k${k}`, v))) wrong++
      }
    }
    expect(wrong).toBe(0)
    expect(store.freedSlabs).toBeGreaterThan(0) // the free list was exercised
  })
})
