/**
 * Post-copy features with both guests in this process (real userfaultfd,
 * real TCP on loopback, agents in their worker threads): cooperative hints
 * (isLocal, ready, willNeed), free-page and zero-page skipping, prepaging
 * order in the report's push log.
 */
import { readFileSync } from 'node:fs'
import { describe, expect, it } from 'vitest'
import { Guest } from '../src/guest'
import type { MigrateOptions } from '../src/guest'
import { freePort } from '../src/cli/proc'
import { kernelSkipReason } from './helpers/gate'
import { Relay } from '../src/testing/relay'

const skip = kernelSkipReason()
const TOKEN = 'postcopy-tests-token-0123456789'
const PS = 4096
const MiB = 1 << 20

async function pair(sizeBytes: number) {
  const port = await freePort()
  // exitOnMoved: false on both: a failure after the hand-off is the test's to see (ready() and settled reject), and it
  // must not end the test runner's process
  const destination = Guest.start({ name: `d-${port}`, regions: { mem: sizeBytes }, receive: `127.0.0.1:${port}`, token: TOKEN, control: false, exitOnMoved: false })
  destination.catch(() => {})
  const source = await Guest.start({ name: `s-${port}`, regions: { mem: sizeBytes }, token: TOKEN, control: false, exitOnMoved: false, pause: () => ({ at: 'handoff' }) })
  const migrate = (o: Partial<MigrateOptions> = {}) => source.migrate({ to: `127.0.0.1:${port}`, ...o })
  return { source, destination, migrate }
}

/** Mappings of this process of exactly `bytes` registered with a userfaultfd for missing faults only, as a destination's are (a sync-wp source's have write-protect too). */
function missingRegistered(bytes: number): number {
  const vmas = readFileSync('/proc/self/smaps', 'utf8').split(/\n(?=[0-9a-f]+-[0-9a-f]+ )/)
  return vmas.filter((v) => new RegExp(`^Size:\\s+${bytes / 1024} kB$`, 'm').test(v) && /^VmFlags:.* um( |$)/m.test(v) && !/^VmFlags:.* uw( |$)/m.test(v)).length
}

function fill(buf: ArrayBuffer, pages: Iterable<number>) {
  const u32 = new Uint32Array(buf)
  for (const p of pages) {
    u32[(p * PS) / 4] = p + 1
    u32[(p * PS) / 4 + 1000] = 0xabcdef
  }
}

describe.skipIf(skip)('post-copy with cooperative hints', () => {
  it('ready() resolves only when the range is local, with the source bytes; isLocal() agrees with the received bitmap', async () => {
    const { source, destination, migrate } = await pair(64 * MiB)
    fill(source.regions.mem.buffer, Array.from({ length: 8192 }, (_, p) => p)) // first 32 MiB has data, the rest never touched
    // demand only, no idle fill: nothing moves unless asked
    const report = migrate({ mode: 'postcopy', prepaging: { strategy: 'demand', idleFillMs: 3_000 } })
    const dest = await destination
    const r = dest.regions.mem
    expect(dest.restored).toBe(true)
    expect(dest.state).toEqual({ at: 'handoff' })
    // never-touched pages are local at once (zero, never fetched); data pages are not
    expect(r.isLocal(40 * MiB, 4 * MiB)).toBe(true)
    expect(r.isLocal(100 * PS, 3 * PS)).toBe(false)
    expect(r.isLocal(0, 64 * MiB)).toBe(false)
    // what isLocal() says at the moment ready() resolves (not after a later
    // check: the agent's thread may install the pages at any time after the call)
    const localWhenResolved = await r.ready(100 * PS, 3 * PS).then(() => r.isLocal(100 * PS, 3 * PS))
    expect(localWhenResolved).toBe(true)
    expect(r.isLocal(99 * PS, PS)).toBe(false)
    const u32 = new Uint32Array(r.buffer)
    expect([u32[(100 * PS) / 4], u32[(101 * PS) / 4], u32[(102 * PS) / 4 + 1000]]).toEqual([101, 102, 0xabcdef])
    await dest.settled
    const rep = await report
    expect(rep.postcopy.demandPages).toBeGreaterThanOrEqual(3)
    expect(rep.pagesSentTwiceAfterHandoff).toBe(0)
    // settled: the registrations end with it (none held past it: a guest that moves on keeps no descriptor per hop)
    expect(missingRegistered(64 * MiB)).toBe(0)
    expect(Buffer.compare(Buffer.from(dest.regions.mem.buffer), Buffer.from(source.regions.mem.buffer))).toBe(0)
    await dest.close()
    await source.close()
  })

  it('ready() rejects with a clear error when the source goes away and does not come back in time', async () => {
    const { source, destination, migrate } = await pair(16 * MiB)
    fill(source.regions.mem.buffer, Array.from({ length: 4096 }, (_, p) => p))
    const report = migrate({ mode: 'postcopy', prepaging: { strategy: 'demand', idleFillMs: 60_000 }, recoveryTimeoutMs: 500 })
    report.catch(() => {})
    const dest = await destination
    await dest.regions.mem.ready(0, PS)
    await source.close() // the source's agent and its sockets go away
    const err = await dest.regions.mem.ready(2000 * PS, PS).catch((e) => e)
    expect(err.code).toBe('ERR_MIGRATION_CONNECTION')
    expect(err.message).toMatch(/did not reconnect within 500 ms/)
    await expect(dest.settled).rejects.toMatchObject({ code: 'ERR_MIGRATION_CONNECTION' })
    // the pages that never arrived must never read as zero, not even once the agent is gone: the region stays
    // registered for missing faults (smaps' VmFlags "um") after close() as before it (without that, the kernel
    // unregisters it with the agent's userfaultfd and a touch of such a page maps a zero page)
    const registered = () => missingRegistered(16 * MiB)
    const before = registered()
    expect(before).toBeGreaterThanOrEqual(1)
    await dest.close()
    expect(registered()).toBe(before)
  })

  it("emits 'recovering' when the link breaks after the hand-off, keeps a waiting ready() and settles with the source's bytes", async () => {
    const port = await freePort()
    const destination = Guest.start({ name: `d-${port}`, regions: { mem: 64 * MiB }, receive: `127.0.0.1:${port}`, token: TOKEN, control: false })
    destination.catch(() => {})
    const source = await Guest.start({ name: `s-${port}`, regions: { mem: 64 * MiB }, token: TOKEN, control: false, exitOnMoved: false })
    fill(source.regions.mem.buffer, Array.from({ length: 16384 }, (_, p) => p))
    // nothing is pushed until asked: the cut comes with the first 3 MiB of replies
    const relay = new Relay(3 * MiB)
    const to = await relay.start('127.0.0.1', port)
    const report = source.migrate({ to, mode: 'postcopy', prepaging: { strategy: 'demand', idleFillMs: 500 } })
    const dest = await destination
    const recovering = new Promise<string>((resolve) => dest.on('recovering', resolve))
    await dest.regions.mem.ready(0, 4 * MiB) // 4 MiB of replies: the link breaks half-way, ready() waits on
    expect(await recovering).toMatch(/connection broke during post-copy.*waiting up to 60000 ms/)
    expect(relay.cuts).toBe(1)
    await dest.settled
    const rep = await report
    expect(rep.postcopy.recoveries).toBe(1)
    expect(Buffer.compare(Buffer.from(dest.regions.mem.buffer), Buffer.from(source.regions.mem.buffer))).toBe(0)
    relay.close()
    await Promise.all([dest.close(), source.close()])
  })

  it('willNeed() moves a range to the front of the push (seen in the push log)', async () => {
    const { source, destination, migrate } = await pair(256 * MiB)
    const pages = (256 * MiB) / PS
    fill(source.regions.mem.buffer, Array.from({ length: pages }, (_, p) => p))
    const report = migrate({ mode: 'postcopy', prepaging: { strategy: 'bubble' }, pushLog: true })
    const dest = await destination
    const target = pages - 64
    dest.regions.mem.willNeed(target * PS, 32 * PS)
    await dest.settled
    const rep = await report
    const log = rep.postcopy.pushLog!
    const at = log.findIndex((r) => r.firstPage <= target && target < r.firstPage + r.pageCount)
    // sequential push would reach the last pages last; the hint pulls them near the front
    expect(at).toBeGreaterThanOrEqual(0)
    expect(at).toBeLessThan(log.length / 4)
    expect(new Uint32Array(dest.regions.mem.buffer)[(target * PS) / 4]).toBe(target + 1)
    await dest.close()
    await source.close()
  })
})

describe.skipIf(skip)('free and zero pages never travel', () => {
  it('a 1 GiB guest with 90% reported free: bytes on the wire ~ used memory, free pages read zero, used pages match', async () => {
    const size = 1024 * MiB
    const { source, destination, migrate } = await pair(size)
    const slab = MiB
    const slabs = size / slab
    const used = (i: number) => i % 10 === 3
    fill(source.regions.mem.buffer, Array.from({ length: size / PS }, (_, p) => p))
    // 88% freed before, 2% while pre-copy runs
    const late = (i: number) => i % 50 === 7
    for (let i = 0; i < slabs; i++) if (!used(i) && !late(i)) source.regions.mem.free(i * slab, slab)
    let freedLate = false
    source.on('progress', () => {
      if (freedLate) return
      freedLate = true
      // guest.free(), by name and by region object: the same as region.free()
      for (let i = 0; i < slabs; i++) if (late(i)) source.free(i % 2 ? 'mem' : source.regions.mem, i * slab, slab)
    })
    const rep = await migrate({ mode: 'hybrid' })
    const dest = await destination
    await dest.settled
    const usedBytes = (size * 10) / 100
    expect(rep.bytesOnWire).toBeLessThan(0.15 * size)
    expect(rep.bytesOnWire).toBeGreaterThan(usedBytes)
    expect(rep.pages.free + rep.pages.zero).toBeGreaterThan((0.85 * size) / PS)
    expect(rep.postcopy.networkFaultsOnZeroPages).toBe(0)
    const s = Buffer.from(source.regions.mem.buffer)
    const d = Buffer.from(dest.regions.mem.buffer)
    const zero = Buffer.alloc(slab)
    for (let i = 0; i < slabs; i++) {
      const ds = d.subarray(i * slab, (i + 1) * slab)
      if (used(i)) expect(Buffer.compare(ds, s.subarray(i * slab, (i + 1) * slab))).toBe(0)
      else expect(Buffer.compare(ds, zero)).toBe(0)
    }
    await dest.close()
    await source.close()
  })

  it('free() on the destination during post-copy: the range reads zero at once and a touch right after never crosses the network', async () => {
    const { source, destination, migrate } = await pair(16 * MiB)
    fill(source.regions.mem.buffer, Array.from({ length: 4096 }, (_, p) => p))
    const report = migrate({ mode: 'postcopy', prepaging: { strategy: 'demand', idleFillMs: 2_000 } })
    const dest = await destination
    const r = dest.regions.mem
    const u32 = new Uint32Array(r.buffer)
    await r.ready(64 * PS, 2 * PS) // two pages here already (received), 62 still at the source
    expect(u32[(64 * PS) / 4]).toBe(65)
    // a slab freed and reused at once, as an allocator does (the kv-store example): the agent's thread has not run
    // between free() and these reads; without the zero fill in free() itself they fault and fetch the old bytes
    r.free(0, 128 * PS)
    const read = [0, 1, 63, 64, 65, 127].map((p) => u32[(p * PS) / 4] + u32[(p * PS) / 4 + 1000])
    expect(read).toEqual([0, 0, 0, 0, 0, 0])
    u32[(5 * PS) / 4] = 7
    await r.ready(0, 128 * PS)
    expect(u32[(5 * PS) / 4]).toBe(7) // not overwritten by a late zero fill or a pushed page
    expect(u32[(200 * PS) / 4]).toBe(201)
    await dest.settled
    const rep = await report
    expect(rep.postcopy.networkFaults).toBe(1) // page 200's only
    expect(rep.pagesSentTwiceAfterHandoff).toBe(0)
    // the ~125 freed pages still at the source then (all of 1..127 but 64, 65 and what a read-ahead took) never
    // crossed: the source dropped them from what it pushes (FREED)
    expect(rep.postcopy.pushedPages + rep.postcopy.demandPages).toBeLessThanOrEqual(rep.pagesMissingAtHandoff - 100)
    expect(u32[(6 * PS) / 4] + u32[(130 * PS) / 4]).toBe(131)
    await dest.close()
    await source.close()
  })

  it('zero and never-touched pages are the zero page on the destination before its service runs: no fault, never over the network', async () => {
    const { source, destination, migrate } = await pair(32 * MiB)
    const data = [5, 6, 7, 1000, 5000]
    fill(source.regions.mem.buffer, data)
    new Uint8Array(source.regions.mem.buffer)[3000 * PS] = 0 // touched, but all zero
    const report = migrate({ mode: 'postcopy', prepaging: { strategy: 'demand', idleFillMs: 2_000 } })
    const dest = await destination
    const u32 = new Uint32Array(dest.regions.mem.buffer)
    // the main thread faults on the data pages (the agent fetches them); the zero ones are there already
    let sum = 0
    for (const p of [0, 1, 3000, 4000, 8000, 8191]) sum += u32[(p * PS) / 4]
    for (const p of data) sum += u32[(p * PS) / 4]
    expect(sum).toBe(data.reduce((a, p) => a + p + 1, 0))
    await dest.settled
    const rep = await report
    expect(rep.postcopy.localZeroFaults).toBe(0)
    expect(rep.postcopy.networkFaultsOnZeroPages).toBe(0)
    // the data pages only: 5, then 6, which is at the end of 5's run, so it asks for two pages (demand read-ahead)
    // and 7 comes with it; then 1000 and 5000
    expect(rep.postcopy.networkFaults).toBe(4)
    expect(rep.postcopy.readAheadPages).toBe(1)
    await dest.close()
    await source.close()
  })
})

describe.skipIf(skip)('kv-store example', () => {
  it('moves under a checking client in post-copy with ready() on its request path: no wrong answer, every key verified', async () => {
    const { migrateExample } = await import('../src/cli/demo')
    // demand-only prepaging: the keys the client reads are not local until the service asks for them, however fast the
    // push would have been (with the native writer a push of 128 MiB could finish before a slow service's first request)
    const r = await migrateExample({ example: 'kv-store', sizeMiB: 128, keys: 20_000, mode: 'postcopy', serviceArgs: ['--ready'], sendArgs: ['--prepaging', 'demand'] })
    expect(r.error).toBeUndefined()
    expect(r.verify).toMatch(/^ok keys=\d+ freedSlabs=\d+$/)
    expect(Number(/freedSlabs=(\d+)/.exec(r.verify!)![1])).toBeGreaterThan(0)
    expect(r.client!.wrong).toBe(0)
    expect(r.client!.ok).toBeGreaterThan(100)
    expect(r.sourceExit).toBe(0)
    // the service asked with ready() (for pages that were not local yet); its thread never faulted over the network
    const waits = Number(r.destLines!.find((l) => l.startsWith('READY_WAITS '))?.slice(12))
    expect(waits).toBeGreaterThan(0)
    expect(r.report!.postcopy.networkFaults).toBe(0)
    expect(r.report!.postcopy.demandPages).toBeLessThanOrEqual(r.report!.postcopy.pagesLocalAtDestination)
    expect(r.report!.pagesSentTwiceAfterHandoff).toBe(0)
  })
})
