/** What a destination can still allocate (src/memory-headroom.ts), from the files the kernel shows, for each layout. */
import { describe, expect, it } from 'vitest'
import { headroomCheck, memoryHeadroom, refuseUnlessRoom, MEMORY_MARGIN_BYTES } from '../../src/memory-headroom'

const MiB = 1 << 20
const files = (f: Record<string, string>) => (path: string) => f[path]
const meminfo = (availMiB: number) => `MemTotal:       25165824 kB\nMemFree:        1000 kB\nMemAvailable:   ${availMiB * 1024} kB\nBuffers:  0 kB\n`

describe('memory headroom', () => {
  it('cgroup v1 (a hybrid host, as this VM): the memory controller\'s limit less its usage, inactive file cache counted free; an unlimited parent does not count', () => {
    const room = memoryHeadroom(files({
      '/proc/meminfo': meminfo(20_000),
      '/proc/self/mountinfo': [
        '31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755',
        '35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory',
        '40 31 0:37 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw',
      ].join('\n'),
      '/proc/self/cgroup': '9:name=systemd:/\n4:memory:/svc/web\n1:cpu:/\n0::/\n',
      '/sys/fs/cgroup/memory/svc/web/memory.limit_in_bytes': String(300 * MiB),
      '/sys/fs/cgroup/memory/svc/web/memory.usage_in_bytes': String(100 * MiB),
      '/sys/fs/cgroup/memory/svc/web/memory.stat': `cache 0\ninactive_file ${4 * MiB}\ntotal_inactive_file ${10 * MiB}\n`,
      '/sys/fs/cgroup/memory/svc/memory.limit_in_bytes': '9223372036854771712',
      '/sys/fs/cgroup/memory/svc/memory.usage_in_bytes': String(5000 * MiB),
    }))
    // (v1 counts the hierarchy in total_inactive_file, as in its usage; the cgroup alone in inactive_file)
    expect(room).toEqual({ bytes: 210 * MiB, limitedBy: 'the memory cgroup /svc/web (memory.limit_in_bytes 300.0 MiB)' })
  })

  it('cgroup v2: the tightest limit on the way up (memory.max of a parent), "max" being none', () => {
    const room = memoryHeadroom(files({
      '/proc/meminfo': meminfo(20_000),
      '/proc/self/mountinfo': '30 1 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate',
      '/proc/self/cgroup': '0::/system.slice/web.service\n',
      '/sys/fs/cgroup/system.slice/web.service/memory.max': 'max\n',
      '/sys/fs/cgroup/system.slice/web.service/memory.current': String(200 * MiB),
      '/sys/fs/cgroup/system.slice/memory.max': String(1024 * MiB),
      '/sys/fs/cgroup/system.slice/memory.current': String(900 * MiB),
      '/sys/fs/cgroup/system.slice/memory.stat': `anon 1\ninactive_file ${24 * MiB}\n`,
    }))
    expect(room).toEqual({ bytes: 148 * MiB, limitedBy: 'the memory cgroup /system.slice (memory.max 1.0 GiB)' })
  })

  it('in a container: the cgroup mount shows its own subtree (mountinfo root), and the host\'s MemAvailable may be lower still', () => {
    const read = files({
      '/proc/meminfo': meminfo(100),
      '/proc/self/mountinfo': '700 600 0:26 /kubepods/pod1/c1 /sys/fs/cgroup ro,nosuid - cgroup2 cgroup2 rw',
      '/proc/self/cgroup': '0::/kubepods/pod1/c1\n',
      '/sys/fs/cgroup/memory.max': String(2048 * MiB),
      '/sys/fs/cgroup/memory.current': String(48 * MiB),
    })
    expect(memoryHeadroom(read)).toEqual({ bytes: 100 * MiB, limitedBy: "the host's available memory (MemAvailable)" })
    expect(memoryHeadroom((p) => (p === '/proc/meminfo' ? meminfo(1_000_000) : read(p)))).toEqual({ bytes: 2000 * MiB, limitedBy: 'the memory cgroup /kubepods/pod1/c1 (memory.max 2.0 GiB)' })
  })

  it('nothing readable: no figure, and no check', () => {
    expect(memoryHeadroom(() => undefined)).toBeUndefined()
    expect(() => refuseUnlessRoom(10 * 1024 * MiB, undefined)).not.toThrow()
  })

  it("the doctor's line: what a receiver here takes, or why it cannot tell", () => {
    const room = { bytes: 1024 * MiB, limitedBy: 'the memory cgroup /svc (memory.max 2.0 GiB)' }
    expect(headroomCheck(room, {})).toEqual({
      available: true,
      detail: '1.0 GiB can be allocated here, limited by the memory cgroup /svc (memory.max 2.0 GiB): a receiver here takes a guest holding up to 960.0 MiB and refuses a larger one before any page moves (ERR_MIGRATION_MEMORY)',
    })
    expect(headroomCheck(room, { UFFD_MIGRATE_MEMORY_CHECK: '0' })).toMatchObject({ available: false, detail: expect.stringMatching(/check is off/) })
    expect(headroomCheck(undefined, {})).toMatchObject({ available: false, detail: expect.stringMatching(/cannot tell/) })
  })

  it('the guest fits with the margin kept, or the error says what limits it and what to do', () => {
    const room = { bytes: 512 * MiB, limitedBy: 'the memory cgroup /svc (memory.max 600.0 MiB)' }
    expect(() => refuseUnlessRoom(512 * MiB - MEMORY_MARGIN_BYTES, room)).not.toThrow()
    expect(() => refuseUnlessRoom(512 * MiB - MEMORY_MARGIN_BYTES + 4096, room)).toThrow(expect.objectContaining({
      code: 'ERR_MIGRATION_MEMORY',
      message: expect.stringMatching(/it has 448\.0 MiB resident at the source and 512\.0 MiB can still be allocated here, limited by the memory cgroup \/svc .*free memory on the destination or raise its limit/),
    }))
  })
})
