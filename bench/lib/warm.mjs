// Warms memory before the first timed case: this VM's memory is backed
// lazily by the host (the first touch of a guest-physical page that was never
// used costs ~10 µs; a 4 GiB migration measured 14.7 s cold, 4.8 s warm), and
// it takes freed memory back within seconds (virtio_balloon free page
// reporting: every free, whole 2 MiB block). So touching memory and freeing
// it does not keep it warm; a keeper process (bench/c/warm_keeper.c) touches
// it and frees all but one page in 64, so that no 2 MiB block is whole and
// free again, and keeps those pages until this process exits. Every process
// that runs next (ours, the C references) is served from the warm pieces first.
import { spawn } from 'node:child_process'
import { existsSync, mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createRequire } from 'node:module'
import { buildCBench, repoRoot } from './limits.mjs'

const require = createRequire(import.meta.url)
const GiB = 2 ** 30
const MiB = 2 ** 20
let keptBytes = 0
let keeperFailed = false

/**
 * Makes sure at least `bytes` of memory are warm and stay warm for the rest of this process (keeper processes that
 * die with it); returns the seconds it took (0 when they already were). Without gcc: touches and frees the memory
 * (warm only for the next few seconds on this VM).
 */
export function prewarm(bytes) {
  if (bytes <= keptBytes) return 0
  const t0 = performance.now()
  const bin = keeperFailed ? null : buildCBench(join(repoRoot, 'bench', 'c', 'warm_keeper.c'))
  if (!bin || !startKeeper(bin, Math.ceil((bytes - keptBytes) / MiB))) {
    keeperFailed = true
    touchAndFree(bytes)
  } else keptBytes = bytes
  return (performance.now() - t0) / 1000
}

function startKeeper(bin, mib) {
  const dir = mkdtempSync(join(tmpdir(), 'uffd-warm-'))
  const ready = join(dir, 'ready')
  const child = spawn(bin, [String(mib), ready], { stdio: ['ignore', 'ignore', 'inherit'] })
  child.unref()
  const sleeper = new Int32Array(new SharedArrayBuffer(4))
  // ~10 µs a page cold: 60 s covers 24 GiB
  for (const deadline = Date.now() + 60_000 + mib * 4; !existsSync(ready) && child.exitCode === null && Date.now() < deadline; ) Atomics.wait(sleeper, 0, 0, 50)
  const ok = existsSync(ready)
  rmSync(dir, { recursive: true, force: true })
  if (!ok) child.kill('SIGKILL')
  return ok
}

function touchAndFree(bytes) {
  const { Region } = require(join(repoRoot, 'dist', 'region.js'))
  const parts = []
  for (let left = bytes; left > 0; left -= 4 * GiB) parts.push(Region.create('prewarm', Math.min(left, 4 * GiB)))
  for (const r of parts) {
    const u8 = new Uint8Array(r.buffer)
    for (let off = 0; off < r.sizeBytes; off += r.pageSize) u8[off] = 1
  }
  for (const r of parts) r.release()
}
