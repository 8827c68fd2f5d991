/**
 * Encrypted migrations between real processes over real TCP: a relay between the hosts reads (and in one case
 * changes) every byte on the way, as someone on the path would. What it reads must not be the guest's memory, and
 * what it changes must never reach it.
 */
import { afterEach, describe, expect, it } from 'vitest'
import { migrateExample } from '../src/cli/demo'
import { Relay } from '../src/testing/relay'
import { kernelSkipReason } from './helpers/gate'

const skip = kernelSkipReason()
const MiB = 1 << 20

/** A relay that counts what goes towards the destination and the longest run of zero bytes in it. */
function wiretap(): { relay: Relay; seen: { bytes: number; longestZeroRun: number } } {
  const relay = new Relay(Infinity)
  const seen = { bytes: 0, longestZeroRun: 0 }
  let run = 0
  relay.tap = (chunk, toDestination) => {
    if (!toDestination) return
    seen.bytes += chunk.length
    for (const b of chunk) {
      run = b === 0 ? run + 1 : 0
      if (run > seen.longestZeroRun) seen.longestZeroRun = run
    }
  }
  return { relay, seen }
}

describe.skipIf(skip)('encrypted migrations (--encrypt)', () => {
  let relay: Relay | undefined
  afterEach(() => relay?.close())

  // The page-store's pages are sparse words between zeros: in plaintext the stream holds runs of thousands of zero
  // bytes (and so does the plaintext control in test/unit/encryption.test.ts); sealed, a run of 64 has a chance of 2^-512.
  // native: the bulk threads seal and open the records themselves (native/records.h); js: UFFD_MIGRATE_SEAL=js on
  // both hosts, the sealed connections stay with the agents' loops
  it.each(['native', 'js'] as const)('hybrid under writes, asked by the source (%s sealing): every page verified, nothing of the memory readable on the wire', async (path) => {
    const tap = wiretap()
    relay = tap.relay
    const env: Record<string, string> = path === 'js' ? { UFFD_MIGRATE_SEAL: 'js' } : {}
    const r = await migrateExample({
      sizeMiB: 64, mode: 'hybrid', writesPerSec: 10_000, sendArgs: ['--encrypt'], relay: (h, p) => tap.relay.start(h, p), sendTimeoutMs: 45_000,
      sourceEnv: env, destEnv: env,
    })
    expect(r.error).toBeUndefined()
    expect(r.verify).toBe('ok pages=16384')
    expect(r.ok).toBe(true)
    const rep = r.report!
    expect(rep.encrypted).toBe(true)
    expect(rep.bulkReceive).toBe(path)
    // native: the demand threads seal the demand connection too; js: page requests go on urgent, through the agents' loops
    expect(rep.postcopy.demandPath).toBe(path)
    expect(tap.seen.bytes).toBeGreaterThan(56 * MiB)
    expect(tap.seen.longestZeroRun).toBeLessThan(64)
    expect(r.destLog).toMatch(/a migration from \S+ began \(migration [0-9a-f]+, encrypted\)/)
  })

  it('hybrid over 3 parallel bulk streams, each sealed by its own threads: every page verified, nothing readable on the wire', async () => {
    const tap = wiretap()
    relay = tap.relay
    const r = await migrateExample({ sizeMiB: 128, mode: 'hybrid', writesPerSec: 10_000, sendArgs: ['--encrypt', '--streams', '3'], relay: (h, p) => tap.relay.start(h, p), sendTimeoutMs: 45_000 })
    expect(r.error).toBeUndefined()
    expect(r.verify).toBe('ok pages=32768')
    expect(r.ok).toBe(true)
    expect(r.report!.encrypted).toBe(true)
    expect(r.report!.streams).toBe(3)
    expect(r.report!.pagesSentTwiceAfterHandoff).toBe(0)
    expect(tap.relay.connections).toBe(5) // urgent, bulk, demand and two extra streams
    expect(tap.seen.longestZeroRun).toBeLessThan(64)
  })

  it('postcopy with a service that blocks in faults: each fault goes through the sealed demand connection, timed', async () => {
    const r = await migrateExample({ sizeMiB: 64, mode: 'postcopy', writesPerSec: 10_000, serviceArgs: ['--blocking'], sendArgs: ['--encrypt'], sendTimeoutMs: 45_000 })
    expect(r.error).toBeUndefined()
    expect(r.ok).toBe(true)
    const pc = r.report!.postcopy
    expect(r.report!.encrypted).toBe(true)
    expect(pc.demandPath).toBe('native')
    expect(pc.networkFaults).toBeGreaterThan(0)
    expect(pc.faultLatencyUs.count).toBe(pc.networkFaults)
    expect(pc.demandPages).toBeGreaterThan(0)
  })

  it('postcopy to a receiver that insists (receive --encrypt), the source not asking: sealed all the same', async () => {
    const tap = wiretap()
    relay = tap.relay
    const r = await migrateExample({
      sizeMiB: 64, mode: 'postcopy', writesPerSec: 10_000, relay: (h, p) => tap.relay.start(h, p), sendTimeoutMs: 45_000,
      receiveArgs: ['--encrypt'],
    })
    expect(r.error).toBeUndefined()
    expect(r.ok).toBe(true)
    expect(r.report!.encrypted).toBe(true)
    expect(tap.seen.longestZeroRun).toBeLessThan(64)
  })

  it('a byte changed on the way after the hand-off is caught, never placed: the link is taken as broken, the source dials in again on fresh keys, every page verified', async () => {
    relay = new Relay(Infinity)
    relay.corruptAtByte = 24 * MiB // in the post-copy push
    const r = await migrateExample({ sizeMiB: 64, mode: 'postcopy', writesPerSec: 10_000, sendArgs: ['--encrypt'], relay: (h, p) => relay!.start(h, p), sendTimeoutMs: 45_000 })
    expect(r.error).toBeUndefined()
    expect(r.verify).toBe('ok pages=16384')
    expect(r.ok).toBe(true)
    expect(r.report!.postcopy.recoveries).toBeGreaterThanOrEqual(1)
    expect(r.destLog).toMatch(/failed its integrity check: its bytes were changed, dropped or replayed between the hosts/)
  })

  it('a byte changed on the way before the hand-off fails that try: the service runs on at the source', async () => {
    relay = new Relay(Infinity)
    relay.corruptAtByte = 16 * MiB // in round 0
    const r = await migrateExample({ sizeMiB: 64, mode: 'precopy', writesPerSec: 10_000, sendArgs: ['--encrypt'], relay: (h, p) => relay!.start(h, p), sendTimeoutMs: 45_000 })
    expect(r.ok).toBe(false)
    expect(r.destLog).toMatch(/failed its integrity check/)
    // the source hears why from the destination on the connection that was not touched
    expect(r.error).toMatch(/peer reported: a record on the encrypted bulk connection failed its integrity check/)
    expect(r.sourceLog).toMatch(/failed: .*integrity check.*; the service runs on here/)
  })
})
