/**
 * Feature gate for tests that need the real kernel: the doctor says why a
 * test cannot run here, and the skip is printed loudly, never silent.
 */
import { runDoctor } from '../../src/doctor'

let cached: string | undefined | null = null

export function kernelSkipReason(): string | undefined {
  if (cached === null) {
    const r = runDoctor()
    cached = r.ok ? undefined : r.verdict
    if (cached) console.warn(`\n*** SKIPPING kernel tests: ${cached}\n`)
  }
  return cached
}

let sealedWarned = false

/**
 * The run seals every migration (UFFD_MIGRATE_ENCRYPT=1: the whole e2e suite once more with encrypted links, by
 * hand): a relay cued on a frame type cannot see frames inside sealed records, so such tests skip, loudly.
 */
export function frameCueSkipReason(): string | undefined {
  if (process.env.UFFD_MIGRATE_ENCRYPT !== '1') return undefined
  const why = 'UFFD_MIGRATE_ENCRYPT=1: a link fault cued on a frame type cannot see inside sealed records'
  if (!sealedWarned) console.warn(`\n*** SKIPPING frame-cued link-fault tests: ${why}\n`)
  sealedWarned = true
  return why
}

/** The tracker a migration from this process's children must report: the forced one ($UFFD_MIGRATE_TRACKER, set by the sync-wp pass of vitest.config.ts) or the doctor's choice. */
export function expectedTracker(): 'wp-async' | 'sync-wp' | undefined {
  const forced = process.env.UFFD_MIGRATE_TRACKER
  if (forced === 'sync-wp' || forced === 'wp-async') return forced
  return runDoctor().tracker?.kind
}
