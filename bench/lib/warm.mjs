// Warms memory before the first timed case: this VM's memory is backed
// lazily by the host, and the first touch of a guest-physical page that was
// never used costs ~10 µs (a 4 GiB migration measured 14.7 s cold, 4.8 s
// warm). Touching `bytes` once and freeing it leaves the host backing in
// place for the processes that run next (ours, and the C references).
import { join } from 'node:path'
import { createRequire } from 'node:module'
import { repoRoot } from './limits.mjs'

const require = createRequire(import.meta.url)
const GiB = 2 ** 30

/** Touches every page of `bytes` of fresh memory (in 4 GiB regions), frees it; returns the seconds it took. */
export function prewarm(bytes) {
  const { Region } = require(join(repoRoot, 'dist', 'region.js'))
  const t0 = performance.now()
  const parts = []
  for (let left = bytes; left > 0; left -= 4 * GiB) parts.push(Region.create('prewarm', Math.min(left, 4 * GiB)))
  for (const r of parts) {
    const u8 = new Uint8Array(r.buffer)
    for (let off = 0; off < r.sizeBytes; off += r.pageSize) u8[off] = 1
  }
  for (const r of parts) r.release()
  return (performance.now() - t0) / 1000
}
