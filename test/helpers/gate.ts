/**
 * Feature gate for tests that need the real kernel: the doctor says why a
 * test cannot run here, and the skip is printed loudly, never silent.
 */
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
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

let keylogSaid = false

/**
 * The run seals every migration (UFFD_MIGRATE_ENCRYPT=1: the whole e2e suite once more with encrypted links, by
 * hand): a relay cued on a frame type sees the frames inside sealed records only with the hosts' keys, so this
 * points $UFFD_MIGRATE_KEYLOG at a temporary file for this test file's processes (the hosts it starts inherit it, the
 * relay reads it: src/protocol/keylog.ts) and says so once. Called by the files with frame-cued link faults.
 */
export function seeInsideSealedLinks(): void {
  if (process.env.UFFD_MIGRATE_ENCRYPT !== '1' || process.env.UFFD_MIGRATE_KEYLOG) return
  process.env.UFFD_MIGRATE_KEYLOG = join(mkdtempSync(join(tmpdir(), 'uffdm-keys-')), 'keylog')
  if (!keylogSaid) console.warn(`\n*** sealed links: frame-cued link faults read the hosts' keys from ${process.env.UFFD_MIGRATE_KEYLOG}\n`)
  keylogSaid = true
}

/** The tracker a migration from this process's children must report: the forced one ($UFFD_MIGRATE_TRACKER, set by the sync-wp pass of vitest.config.ts) or the doctor's choice. */
export function expectedTracker(): 'wp-async' | 'sync-wp' | undefined {
  const forced = process.env.UFFD_MIGRATE_TRACKER
  if (forced === 'sync-wp' || forced === 'wp-async') return forced
  return runDoctor().tracker?.kind
}
