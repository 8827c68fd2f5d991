/** What every migrated example must show (test/migrate.e2e.test.ts, test/streams.e2e.test.ts). */
import { expect } from 'vitest'
import type { ExampleResult } from '../../src/cli/demo'
import { expectedTracker } from './gate'

export function expectMigrated(r: ExampleResult, mode: string) {
  expect(r.error).toBeUndefined()
  const rep = r.report!
  expect(rep.mode).toBe(mode)
  // invariant 1: every page equals the model (the versions that crossed in the state) after settling
  expect(r.verify).toMatch(/^ok pages=65536$/)
  // the source process ended once the destination settled
  expect(r.sourceExit).toBe(0)
  // the service kept answering, and never wrongly
  expect(r.client!.wrong).toBe(0)
  expect(r.client!.ok).toBeGreaterThan(100)
  // invariant 2: each page at most once after the hand-off
  expect(rep.pagesSentTwiceAfterHandoff).toBe(0)
  expect(rep.postcopy.networkFaultsOnZeroPages).toBe(0)
  // the tracker this host gets, or the one forced (the sync-wp pass of the suite)
  expect(rep.tracker?.kind).toBe(expectedTracker())
  return rep
}
