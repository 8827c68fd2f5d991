/**
 * Which dirty-page tracker a host gets, from what the kernel offers (pure:
 * the doctor, the agent and the unit tests call it with probe results).
 *
 *   wp-async  UFFD_FEATURE_WP_ASYNC + WP_UNPOPULATED + PAGEMAP_SCAN (Linux 6.7+):
 *             the kernel resolves write faults itself; a round is one scan.
 *   sync-wp   userfaultfd write-protect (Linux 5.7+) with MISSING and
 *             UFFDIO_ZEROPAGE: a native thread resolves the first write to
 *             each page in each round (one fault round trip per such write).
 */
import { ErrorCode, UffdMigrateError } from '../errors'

export type TrackerKind = 'wp-async' | 'sync-wp'
export type TrackerSetting = 'auto' | TrackerKind
export const TRACKER_SETTINGS: readonly TrackerSetting[] = ['auto', 'wp-async', 'sync-wp']

/** What the choice depends on: the kernel's answers (binding.probe() and the doctor's per-range tries). */
export interface TrackerFacts {
  /** UFFDIO_API features offered (UFFD_FEATURE_* bits). */
  features: number
  constants: Record<string, number>
  /** 0 when PAGEMAP_SCAN works, else its errno name. */
  pagemapScan: 0 | string
  /** The addon has the sync-WP tracker's thread (the fake binding does not). */
  syncWpBuilt: boolean
}

export interface TrackerChoice {
  kind: TrackerKind
  /** One sentence for the doctor, the report and status: why this one. */
  reason: string
}

/**
 * How the sync-wp fault thread runs (native/wp_tracker.cc): on the writer's CPU unless UFFD_MIGRATE_WP_FOLLOW=0, in
 * SCHED_IDLE (when following, and where allowed) unless UFFD_MIGRATE_WP_IDLE=0. Both are there to compare.
 */
export function syncWpSettings(env: NodeJS.ProcessEnv = process.env): { followWriter: boolean; idleClass: boolean } {
  return { followWriter: env.UFFD_MIGRATE_WP_FOLLOW !== '0', idleClass: env.UFFD_MIGRATE_WP_IDLE !== '0' }
}

/**
 * What a host on the fallback pays, for the doctor. idleClassAllowed: the process may take a thread out of
 * SCHED_IDLE again (binding.syncWpIdleClass()).
 */
export function syncWpCost(idleClassAllowed: boolean, env: NodeJS.ProcessEnv = process.env): string {
  const { followWriter: follow, idleClass } = syncWpSettings(env)
  const where = follow ? 'on the CPU of the writing thread' : 'where the scheduler puts it (UFFD_MIGRATE_WP_FOLLOW=0)'
  let cls: string
  if (!follow) cls = ''
  else if (!idleClass) cls = ', in the normal class (UFFD_MIGRATE_WP_IDLE=0)'
  else if (idleClassAllowed) cls = ', in SCHED_IDLE so that the woken writer stays on its CPU'
  else {
    cls =
      ', in the normal class: this process may not take a thread out of SCHED_IDLE again (no CAP_SYS_NICE, RLIMIT_NICE ' +
      'below 20 - nice), which costs ~2x a write on a VM with few vCPUs (grant CAP_SYS_NICE or raise RLIMIT_NICE)'
  }
  return `a fault round trip through a native thread (uffdm-wp, ${where}${cls}) for the first write to each page in each pre-copy round: tens of µs on a VM, a few on bare metal`
}

export function asyncWpAvailable(f: TrackerFacts): boolean {
  const want = f.constants.UFFD_FEATURE_WP_ASYNC | f.constants.UFFD_FEATURE_WP_UNPOPULATED
  return (f.features & want) === want && f.pagemapScan === 0
}

export function syncWpAvailable(f: TrackerFacts): boolean {
  return f.syncWpBuilt && (f.features & f.constants.UFFD_FEATURE_PAGEFAULT_FLAG_WP) !== 0
}

/** What wp-async lacks here, in words ('' when it has everything). */
function asyncWpMissing(f: TrackerFacts): string {
  const k = f.constants
  const miss: string[] = []
  if (!(f.features & k.UFFD_FEATURE_WP_ASYNC)) miss.push('UFFD_FEATURE_WP_ASYNC')
  if (!(f.features & k.UFFD_FEATURE_WP_UNPOPULATED)) miss.push('UFFD_FEATURE_WP_UNPOPULATED')
  if (f.pagemapScan !== 0) miss.push(`PAGEMAP_SCAN (${f.pagemapScan})`)
  return miss.join(', ')
}

/** The tracker for these facts and setting; throws ERR_KERNEL_FEATURE with what to do when none fits. */
export function chooseTracker(f: TrackerFacts, setting: TrackerSetting = 'auto', forcedBy = 'the tracker option'): TrackerChoice {
  const syncWhyNot = !f.syncWpBuilt
    ? 'this addon has no sync-WP tracker'
    : 'userfaultfd write-protect is not offered (needs Linux 5.7+ with CONFIG_HAVE_ARCH_USERFAULTFD_WP)'
  if (setting === 'sync-wp') {
    if (!syncWpAvailable(f)) throw new UffdMigrateError(`the sync-WP tracker was forced by ${forcedBy}, but ${syncWhyNot}`, ErrorCode.FEATURE)
    return { kind: 'sync-wp', reason: `forced by ${forcedBy}` }
  }
  if (asyncWpAvailable(f)) {
    return { kind: 'wp-async', reason: setting === 'wp-async' ? `forced by ${forcedBy}` : 'the kernel has WP_ASYNC, WP_UNPOPULATED and PAGEMAP_SCAN (Linux 6.7+): no fault round trip' }
  }
  if (setting === 'wp-async') {
    throw new UffdMigrateError(`the wp-async tracker was forced by ${forcedBy}, but this kernel lacks ${asyncWpMissing(f)} (Linux 6.7+); leave the tracker on auto to use sync-wp`, ErrorCode.FEATURE)
  }
  if (syncWpAvailable(f)) return { kind: 'sync-wp', reason: `the kernel lacks ${asyncWpMissing(f)} (Linux 6.7+): synchronous write-protect instead` }
  throw new UffdMigrateError(
    `no dirty-page tracker works here: the kernel lacks ${asyncWpMissing(f)} (Linux 6.7+) and ${syncWhyNot}; run \`npx uffd-migrate doctor\``,
    ErrorCode.FEATURE,
  )
}

/** 'auto' | 'wp-async' | 'sync-wp' from an option, else $UFFD_MIGRATE_TRACKER, else 'auto'; ERR_INVALID_ARG otherwise. */
export function resolveTrackerSetting(explicit?: string, name = 'options.tracker'): { setting: TrackerSetting; forcedBy: string } {
  const fromEnv = explicit === undefined && process.env.UFFD_MIGRATE_TRACKER !== undefined && process.env.UFFD_MIGRATE_TRACKER !== ''
  const raw = explicit ?? (fromEnv ? process.env.UFFD_MIGRATE_TRACKER : 'auto')
  if (!TRACKER_SETTINGS.includes(raw as TrackerSetting)) {
    throw new UffdMigrateError(`expected ${fromEnv ? 'UFFD_MIGRATE_TRACKER' : name} to be ${TRACKER_SETTINGS.join('|')}, got ${JSON.stringify(raw)}`, ErrorCode.INVALID_ARG)
  }
  return { setting: raw as TrackerSetting, forcedBy: fromEnv ? 'UFFD_MIGRATE_TRACKER' : name }
}
