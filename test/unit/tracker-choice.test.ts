/**
 * Which tracker a host gets, from the kernel's answers: every kernel range the
 * README names, a forced setting, and the errors that say what to do.
 */
import { afterEach, describe, expect, it } from 'vitest'
import { chooseTracker, resolveTrackerSetting, syncWpCost, type TrackerFacts } from '../../src/agent/tracker-choice'
import { ErrorCode } from '../../src/errors'

const K = {
  UFFD_FEATURE_PAGEFAULT_FLAG_WP: 1 << 0,
  UFFD_FEATURE_WP_UNPOPULATED: 1 << 13,
  UFFD_FEATURE_WP_ASYNC: 1 << 15,
}
const WP = K.UFFD_FEATURE_PAGEFAULT_FLAG_WP
// What each kernel's UFFDIO_API and PAGEMAP_SCAN answer (the bits that matter here).
const kernels: Record<string, TrackerFacts> = {
  '6.7+': { features: WP | K.UFFD_FEATURE_WP_UNPOPULATED | K.UFFD_FEATURE_WP_ASYNC, constants: K, pagemapScan: 0, syncWpBuilt: true },
  '6.4-6.6': { features: WP | K.UFFD_FEATURE_WP_UNPOPULATED, constants: K, pagemapScan: 'ENOTTY', syncWpBuilt: true },
  '5.7-6.3': { features: WP, constants: K, pagemapScan: 'ENOTTY', syncWpBuilt: true },
  'before 5.7': { features: 0, constants: K, pagemapScan: 'ENOTTY', syncWpBuilt: true },
}

describe('tracker choice', () => {
  it('gives wp-async on 6.7+ and sync-wp on 5.7-6.6, saying why', () => {
    expect(chooseTracker(kernels['6.7+'])).toEqual({ kind: 'wp-async', reason: expect.stringMatching(/no fault round trip/) })
    const mid = chooseTracker(kernels['6.4-6.6'])
    expect(mid.kind).toBe('sync-wp')
    expect(mid.reason).toMatch(/lacks UFFD_FEATURE_WP_ASYNC, PAGEMAP_SCAN \(ENOTTY\)/)
    expect(mid.reason).not.toMatch(/WP_UNPOPULATED/)
    expect(chooseTracker(kernels['5.7-6.3']).reason).toMatch(/lacks UFFD_FEATURE_WP_ASYNC, UFFD_FEATURE_WP_UNPOPULATED, PAGEMAP_SCAN/)
  })

  it('refuses a kernel without write-protect with ERR_KERNEL_FEATURE and the doctor', () => {
    expect(() => chooseTracker(kernels['before 5.7'])).toThrow(expect.objectContaining({ code: ErrorCode.FEATURE, message: expect.stringMatching(/Linux 5\.7\+.*uffd-migrate doctor/) }))
    // a 6.7 kernel whose addon lacks the fallback still gets wp-async
    expect(chooseTracker({ ...kernels['6.7+'], syncWpBuilt: false }).kind).toBe('wp-async')
    expect(() => chooseTracker({ ...kernels['5.7-6.3'], syncWpBuilt: false })).toThrow(/this addon has no sync-WP tracker/)
  })

  it('forces sync-wp on a new kernel, and refuses to force wp-async on an old one', () => {
    expect(chooseTracker(kernels['6.7+'], 'sync-wp', 'UFFD_MIGRATE_TRACKER')).toEqual({ kind: 'sync-wp', reason: 'forced by UFFD_MIGRATE_TRACKER' })
    expect(chooseTracker(kernels['6.7+'], 'wp-async').reason).toMatch(/^forced by/)
    expect(() => chooseTracker(kernels['5.7-6.3'], 'wp-async', 'options.tracker')).toThrow(
      expect.objectContaining({ code: ErrorCode.FEATURE, message: expect.stringMatching(/forced by options\.tracker.*leave the tracker on auto/) }),
    )
    expect(() => chooseTracker(kernels['before 5.7'], 'sync-wp')).toThrow(/write-protect is not offered/)
  })
})

describe('tracker setting', () => {
  const saved = process.env.UFFD_MIGRATE_TRACKER
  afterEach(() => {
    if (saved === undefined) delete process.env.UFFD_MIGRATE_TRACKER
    else process.env.UFFD_MIGRATE_TRACKER = saved
  })

  it('takes the option, then $UFFD_MIGRATE_TRACKER, then auto; a bad value names its source', () => {
    delete process.env.UFFD_MIGRATE_TRACKER
    expect(resolveTrackerSetting(undefined)).toEqual({ setting: 'auto', forcedBy: 'options.tracker' })
    process.env.UFFD_MIGRATE_TRACKER = 'sync-wp'
    expect(resolveTrackerSetting(undefined)).toEqual({ setting: 'sync-wp', forcedBy: 'UFFD_MIGRATE_TRACKER' })
    expect(resolveTrackerSetting('wp-async')).toEqual({ setting: 'wp-async', forcedBy: 'options.tracker' })
    process.env.UFFD_MIGRATE_TRACKER = 'soft-dirty'
    expect(() => resolveTrackerSetting(undefined)).toThrow(expect.objectContaining({ code: ErrorCode.INVALID_ARG, message: expect.stringMatching(/UFFD_MIGRATE_TRACKER .*"soft-dirty"/) }))
    expect(() => resolveTrackerSetting('fast')).toThrow(/options\.tracker to be auto\|wp-async\|sync-wp/)
  })
})

describe('sync-wp cost (the doctor\'s tracker line)', () => {
  it('names where the fault thread runs and in which class, and what to do when the process cannot use the idle class', () => {
    expect(syncWpCost(true, {})).toMatch(/uffdm-wp, on the CPU of the writing thread, in SCHED_IDLE so that the woken writer stays on its CPU\)/)
    const denied = syncWpCost(false, {})
    expect(denied).toMatch(/in the normal class: this process may not take a thread out of SCHED_IDLE again/)
    expect(denied).toMatch(/grant CAP_SYS_NICE or raise RLIMIT_NICE/)
    expect(syncWpCost(true, { UFFD_MIGRATE_WP_IDLE: '0' })).toMatch(/in the normal class \(UFFD_MIGRATE_WP_IDLE=0\)/)
    // without following the writer there is no idle class either
    const loose = syncWpCost(true, { UFFD_MIGRATE_WP_FOLLOW: '0' })
    expect(loose).toMatch(/where the scheduler puts it \(UFFD_MIGRATE_WP_FOLLOW=0\)\)/)
    expect(loose).not.toMatch(/SCHED_IDLE|normal class/)
  })
})
