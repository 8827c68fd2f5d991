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

  it("names the table pages of a key's whole probe chain (--ready makes each local before it is read)", () => {
    // 512 slots on 4 pages, 400 keys: clusters cross page ends and wrap around the table's end
    const table = memory(512 * 32)
    const store = new Store(table, memory(256 * 64 * 1024))
    for (let i = 0; i < 400; i++) store.put(`k${i}`, valueFor(`k${i}`, 1), 1)
    const t32 = new Uint32Array(table.buffer)
    let crossed = 0
    for (let i = 0; i < 600; i++) {
      const key = `k${i}`
      // the chain's first empty slot, read directly, and the page the walk of pages stops on
      let slot = store.find(key).slot // the key's slot, or the empty one where it would go
      while (t32[(slot * 32) / 4] !== 0) slot = (slot + 1) % 512
      let page = store.homePage(key)
      for (let n = 0; n < 4 && !store.chainEndsOnPage(key, page); n++) page = (page + 1) % 4
      expect(page, key).toBe(Math.floor(slot / 128))
      if (page !== store.homePage(key)) crossed++
    }
    expect(crossed).toBeGreaterThan(0) // some chains did run on into the next page
  })
})
