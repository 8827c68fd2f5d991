/**
 * Issue 13's proof on a real older kernel: `npm run test:kernel -- 6.1` boots
 * Debian 12's Linux 6.1 under QEMU and migrates between two processes inside
 * it (scripts/kernel-guest.mjs), every page verified. It runs here when the
 * machine has what it needs without downloading anything (QEMU, a static
 * busybox, the kernel package already in the cache); otherwise it skips and
 * says what is missing and how to run it by hand.
 */
import { spawn, spawnSync } from 'node:child_process'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'

const root = join(__dirname, '..')
const script = join(root, 'scripts', 'test-kernel.mjs')

// the script's own check: the tools and the kernel package, nothing downloaded
const check = spawnSync(process.execPath, [script, '6.1', '--check'], { encoding: 'utf8' })
const why = check.status === 0 ? undefined : check.stderr.replace(/^test:kernel: /, '').trim() || `exit ${check.status}`
if (why) console.warn(`\n*** SKIPPING the Linux 6.1 guest test: ${why}\n`)

describe.skipIf(why)('a booted Linux 6.1 guest (QEMU)', () => {
  it('runs the doctor (sync-wp chosen) and three migrations between two processes, every page verified', async () => {
    // not spawnSync: a worker blocked for a minute misses vitest's own heartbeats
    const vm = spawn(process.execPath, [script, '6.1'], { env: { ...process.env, KERNEL_TEST_NO_FETCH: '1' } })
    let out = ''
    vm.stdout.on('data', (b) => (out += b))
    vm.stderr.on('data', (b) => (out += b))
    const status = await new Promise<number | null>((resolve) => vm.on('exit', (code) => resolve(code)))
    expect(out).toMatch(/kernel 6\.1\.\S+, uid 0/)
    expect(out).toMatch(/ok {3}tracker +sync-wp: the kernel lacks UFFD_FEATURE_WP_ASYNC/)
    for (const mode of ['hybrid', 'precopy', 'postcopy']) expect(out).toMatch(new RegExp(`^${mode} +64 MiB, 2000 writes/s: ok, ok pages=16384; tracker sync-wp`, 'm'))
    expect(out).toMatch(/KERNEL-TEST PASS/)
    expect(status).toBe(0)
  }, 1_600_000)
})
