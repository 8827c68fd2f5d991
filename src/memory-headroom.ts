/**
 * How much more memory this process can take before the kernel refuses it: the host's MemAvailable, and every memory
 * cgroup limit above the process (v2 `memory.max`, v1 `memory.limit_in_bytes`), each less what that cgroup holds now,
 * its inactive file cache counted as free (the kernel reclaims it first, as MemAvailable counts it). A destination
 * checks the guest's resident size against it before any page moves: a guest that does not fit would fail half-way
 * (ENOMEM placing pages), after the hand-off lose the service, or push the host into reclaim and wake the OOM killer
 * among the host's other services.
 */
import { readFileSync } from 'node:fs'
import { posix } from 'node:path'
import { ErrorCode, migrationError } from './errors'
import { bytes } from './units'

/** The least memory this process may still take, and what sets it. */
export interface Headroom {
  bytes: number
  limitedBy: string
}

/** Reads a text file, undefined when it is not there (the reader is a parameter for the pure tier). */
export type ReadText = (path: string) => string | undefined

const readText: ReadText = (path) => {
  try {
    return readFileSync(path, 'utf8')
  } catch {
    return undefined
  }
}

/** What the guest may grow by, and the service allocate, between the source's count and the last page placed. */
export const MEMORY_MARGIN_BYTES = 64 << 20

/** A cgroup limit at or above this is none (v1 writes "unlimited" as 2^63 rounded down to a page). */
const NO_LIMIT = 2 ** 60

export function memoryHeadroom(read: ReadText = readText): Headroom | undefined {
  const found: Headroom[] = []
  const avail = /^MemAvailable:\s+(\d+) kB$/m.exec(read('/proc/meminfo') ?? '')
  if (avail) found.push({ bytes: Number(avail[1]) * 1024, limitedBy: "the host's available memory (MemAvailable)" })
  for (const dir of memoryCgroupDirs(read)) {
    const v2 = read(`${dir.path}/memory.max`)
    const limit = v2 !== undefined ? (v2.trim() === 'max' ? Infinity : Number(v2)) : Number(read(`${dir.path}/memory.limit_in_bytes`) ?? NaN)
    if (!(limit < NO_LIMIT)) continue
    const usage = Number(read(`${dir.path}/${v2 !== undefined ? 'memory.current' : 'memory.usage_in_bytes'}`) ?? NaN)
    if (!Number.isFinite(usage)) continue
    const stat = read(`${dir.path}/memory.stat`) ?? ''
    // (v1: total_ is the cgroup with its children, as its usage; v2 counts them in inactive_file)
    const cache = Number((/^total_inactive_file (\d+)$/m.exec(stat) ?? /^inactive_file (\d+)$/m.exec(stat))?.[1] ?? 0)
    const file = v2 !== undefined ? 'memory.max' : 'memory.limit_in_bytes'
    found.push({ bytes: Math.max(0, limit - usage + cache), limitedBy: `the memory cgroup ${dir.name} (${file} ${bytes(limit)})` })
  }
  return found.length ? found.reduce((a, b) => (b.bytes < a.bytes ? b : a)) : undefined
}

/**
 * This process's memory cgroups, innermost first, up to the root of their mount: the unified (v2) one and the v1
 * memory controller's, at the mount points /proc/self/mountinfo names (a container sees its own root there).
 */
function memoryCgroupDirs(read: ReadText): { path: string; name: string }[] {
  const mounts = cgroupMounts(read)
  const dirs: { path: string; name: string }[] = []
  for (const line of (read('/proc/self/cgroup') ?? '').split('\n')) {
    const [id, controllers, path] = [line.slice(0, line.indexOf(':')), line.slice(line.indexOf(':') + 1, line.lastIndexOf(':')), line.slice(line.lastIndexOf(':') + 1)]
    if (!path) continue
    const v2 = id === '0' && controllers === ''
    const mount = mounts.find((m) => (v2 ? m.type === 'cgroup2' : m.type === 'cgroup' && m.options.includes('memory')))
    if (!mount || (!v2 && !controllers.split(',').includes('memory'))) continue
    // the cgroup's path is as the root cgroup namespace sees it; the mount shows mount.root of it
    const rel = posix.relative(mount.root, path)
    if (rel.startsWith('..')) continue
    for (let p = rel; ; p = posix.dirname(p)) {
      dirs.push({ path: posix.join(mount.point, p === '.' ? '' : p), name: posix.join('/', mount.root, p === '.' ? '' : p) })
      if (p === '.' || p === '/' || p === '') break
    }
  }
  return dirs
}

/** The doctor's memory line: what a receiver here would take (available false: it cannot tell, or the check is off). */
export function headroomCheck(room: Headroom | undefined, env: NodeJS.ProcessEnv = process.env): { available: boolean; detail: string } {
  if (env.UFFD_MIGRATE_MEMORY_CHECK === '0') return { available: false, detail: 'the receiver\'s memory check is off (UFFD_MIGRATE_MEMORY_CHECK=0): a guest that does not fit fails as it fills memory' }
  if (!room) return { available: false, detail: 'cannot tell what this host can still allocate (/proc/meminfo unreadable): a receiver here does not check' }
  return {
    available: true,
    detail: `${bytes(room.bytes)} can be allocated here, limited by ${room.limitedBy}: a receiver here takes a guest holding up to ` +
      `${bytes(Math.max(0, room.bytes - MEMORY_MARGIN_BYTES))} and refuses a larger one before any page moves (ERR_MIGRATION_MEMORY)`,
  }
}

/** The cgroup hierarchies mounted here: v2 (`cgroup2`) and v1 (`cgroup`, options naming its controllers, e.g. memory). */
export function cgroupMounts(read: ReadText = readText): { root: string; point: string; type: string; options: string[] }[] {
  return (read('/proc/self/mountinfo') ?? '').split('\n').flatMap((l) => {
    const [pre, post] = l.split(' - ')
    const f = pre?.split(' ') ?? [], g = post?.split(' ') ?? []
    return (g[0] === 'cgroup' || g[0] === 'cgroup2') && f[3] && f[4] ? [{ root: f[3], point: f[4], type: g[0], options: (g[2] ?? '').split(',') }] : []
  })
}

/** ERR_MIGRATION_MEMORY when a guest of residentBytes, with the margin, would not fit in the headroom. */
export function refuseUnlessRoom(residentBytes: number, room: Headroom | undefined): void {
  if (!room || residentBytes + MEMORY_MARGIN_BYTES <= room.bytes) return
  throw migrationError(
    ErrorCode.MEMORY,
    `the destination cannot hold this guest: it has ${bytes(residentBytes)} resident at the source and ${bytes(room.bytes)} can still be ` +
      `allocated here, limited by ${room.limitedBy} (${bytes(MEMORY_MARGIN_BYTES)} are kept for the service's own growth): free memory on ` +
      'the destination or raise its limit, then send again (UFFD_MIGRATE_MEMORY_CHECK=0 in the receiver\'s environment skips this check)',
  )
}
