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
