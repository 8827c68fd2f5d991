/**
 * A memory cgroup of its own for an e2e test (root): the cgroup v1 memory controller's hierarchy, or cgroup v2 where
 * the memory controller is enabled there. A string instead says why there is none (the test skips, loudly).
 */
import { existsSync, mkdirSync, readFileSync, rmdirSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { cgroupMounts } from '../../src/memory-headroom'

export interface MemCg {
  dir: string
  /** Write a pid here to move that process in (its children are born in it). */
  procs: string
  /** The limit, in bytes, or none. */
  setLimit(bytes: number | 'none'): void
  /** What its processes hold now, bytes. */
  usage(): number
  /** Removes it (its processes must have ended). */
  remove(): void
}

export function makeMemCg(name: string): MemCg | string {
  if (process.getuid?.() !== 0) return 'not root: cannot create a memory cgroup'
  const mounts = cgroupMounts()
  const v1 = mounts.find((m) => m.type === 'cgroup' && m.options.includes('memory'))
  const v2 = mounts.find((m) => m.type === 'cgroup2' && readable(join(m.point, 'cgroup.subtree_control')).includes('memory'))
  const base = v1?.point ?? v2?.point
  if (!base) return 'no memory cgroup controller here (neither cgroup v1 memory nor cgroup v2 with memory in subtree_control)'
  const dir = join(base, name)
  try {
    if (!existsSync(dir)) mkdirSync(dir)
  } catch (err) {
    return `cannot create ${dir}: ${(err as Error).message}`
  }
  const [limitFile, usageFile, none] = v1 ? ['memory.limit_in_bytes', 'memory.usage_in_bytes', '-1'] : ['memory.max', 'memory.current', 'max']
  return {
    dir,
    procs: join(dir, 'cgroup.procs'),
    setLimit: (bytes) => writeFileSync(join(dir, limitFile), bytes === 'none' ? none : String(bytes)),
    usage: () => Number(readFileSync(join(dir, usageFile), 'utf8')),
    remove: () => {
      // (its processes were killed: the last may take a moment to leave)
      for (let i = 0; i < 50; i++) {
        try {
          return rmdirSync(dir)
        } catch {
          Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 100)
        }
      }
    },
  }
}

function readable(path: string): string {
  try {
    return readFileSync(path, 'utf8')
  } catch {
    return ''
  }
}
