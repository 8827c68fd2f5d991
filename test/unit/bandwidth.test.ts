/** Bandwidth limits: the rates people write, the checks, which phase is limited, and each bulk socket's share. */
import { describe, expect, it } from 'vitest'
import { Bandwidth, perConnection } from '../../src/agent/source/bandwidth'
import { SourcePhase } from '../../src/agent/source/machine'
import { bandwidthLimits, validateBandwidth, validateMigrateOptions } from '../../src/options'
import { parseRate } from '../../src/units'
import { MigrationCalls } from '../../src/migration-calls'
import type { MainToAgent } from '../../src/agent/messages'

const MiB = 1 << 20
const token = 'x'.repeat(32)

describe('rates', () => {
  it('binary and SI bytes, bits, a plain count, no limit', () => {
    expect(parseRate('100MiB')).toBe(100 * MiB)
    expect(parseRate('100M')).toBe(100 * MiB)
    expect(parseRate('100MiB/s')).toBe(100 * MiB)
    expect(parseRate('1.5GiB')).toBe(1.5 * 1024 * MiB)
    expect(parseRate('50MB')).toBe(50e6)
    expect(parseRate('800Mbit')).toBe(100e6)
    expect(parseRate('10Gbit')).toBe(1.25e9)
    expect(parseRate('1048576')).toBe(MiB)
    expect(parseRate('unlimited')).toBe(0)
    expect(parseRate('0')).toBe(0)
    for (const bad of ['', 'abc', '-5M', '5X', '100Mbps', 'MiB']) expect(parseRate(bad), bad).toBeUndefined()
  })

  it('a limit is 0 or at least 1 MiB/s; migrate() and setBandwidth() check it', () => {
    expect(validateBandwidth(undefined, 'maxBandwidth')).toBe(0)
    expect(validateBandwidth(2.5 * MiB, 'maxBandwidth')).toBe(2.5 * MiB)
    for (const bad of [1000, -1, NaN, Infinity, '5M']) {
      expect(() => validateBandwidth(bad, 'maxBandwidth')).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG', message: expect.stringMatching(/^expected maxBandwidth in bytes a second/) }))
    }
    const wire = validateMigrateOptions({ to: '127.0.0.1:1', maxBandwidth: 8 * MiB }, token)
    expect([wire.maxBandwidth, wire.maxPostcopyBandwidth]).toEqual([8 * MiB, undefined])
    expect(() => validateMigrateOptions({ to: '127.0.0.1:1', maxPostcopyBandwidth: 10 }, token)).toThrow(/maxPostcopyBandwidth/)
    // the switchover bandwidth limits nothing; it is checked as a rate all the same, and 0 means "measure it"
    expect(validateMigrateOptions({ to: '127.0.0.1:1', switchoverBandwidth: 1 << 30 }, token).switchoverBandwidth).toBe(1 << 30)
    expect(validateMigrateOptions({ to: '127.0.0.1:1', switchoverBandwidth: 0 }, token).switchoverBandwidth).toBeUndefined()
    expect(() => validateMigrateOptions({ to: '127.0.0.1:1', switchoverBandwidth: 10 }, token)).toThrow(/^expected switchoverBandwidth in bytes a second: 0 \(the measured rate\) or at least/)
    expect(bandwidthLimits({ maxPostcopyBandwidth: 0 })).toEqual({ postcopyBytesPerSec: 0 })
    expect(() => bandwidthLimits({})).toThrow(/expected maxBandwidth or maxPostcopyBandwidth/)
  })
})

describe('which transfer is limited', () => {
  it('pre-copy by its limit, the hand-off never, post-copy (and its recovery) by its own', () => {
    const bw = new Bandwidth({ precopyBytesPerSec: 8 * MiB, postcopyBytesPerSec: 2 * MiB })
    const seen: [SourcePhase, boolean, number][] = []
    for (const p of [SourcePhase.PRECOPY, SourcePhase.HANDOFF, SourcePhase.POSTCOPY, SourcePhase.RECOVERING, SourcePhase.POSTCOPY, SourcePhase.SETTLED]) {
      seen.push([p, bw.enter(p), bw.bytesPerSec])
    }
    expect(seen).toEqual([
      [SourcePhase.PRECOPY, false, 8 * MiB], // as when connecting
      [SourcePhase.HANDOFF, true, 0],
      [SourcePhase.POSTCOPY, true, 2 * MiB],
      [SourcePhase.RECOVERING, false, 2 * MiB],
      [SourcePhase.POSTCOPY, false, 2 * MiB],
      [SourcePhase.SETTLED, true, 0],
    ])
  })

  it('a change keeps the limit it does not name, and holds in the phases to come', () => {
    const bw = new Bandwidth({ precopyBytesPerSec: 8 * MiB, postcopyBytesPerSec: 0 })
    bw.enter(SourcePhase.PRECOPY)
    bw.set({ postcopyBytesPerSec: 4 * MiB })
    expect([bw.bytesPerSec, bw.current]).toEqual([8 * MiB, { precopyBytesPerSec: 8 * MiB, postcopyBytesPerSec: 4 * MiB }])
    bw.enter(SourcePhase.POSTCOPY)
    expect(bw.bytesPerSec).toBe(4 * MiB)
  })

  it('streams share the limit evenly; no limit stays none', () => {
    expect(perConnection(8 * MiB, 1)).toBe(8 * MiB)
    expect(perConnection(8 * MiB, 3)).toBe(Math.floor((8 * MiB) / 3))
    expect(perConnection(0, 4)).toBe(0)
  })
})

describe('calls on the running migration', () => {
  it('set-bandwidth answers in order; the end of the migration answers the rest; nothing running is refused', async () => {
    const posted: MainToAgent[] = []
    const calls = new MigrationCalls((m) => posted.push(m))
    await expect(calls.setBandwidth(false, () => ({ precopyBytesPerSec: MiB }))).rejects.toMatchObject({ code: 'ERR_INVALID_ARG' })
    const first = calls.setBandwidth(true, () => ({ precopyBytesPerSec: MiB }))
    const second = calls.setBandwidth(true, () => ({ postcopyBytesPerSec: 0 }))
    const third = calls.setBandwidth(true, () => ({ postcopyBytesPerSec: MiB }))
    expect(posted.map((m) => m.type)).toEqual(['setBandwidth', 'setBandwidth', 'setBandwidth'])
    expect(calls.take({ type: 'bandwidthSet', limits: { precopyBytesPerSec: MiB, postcopyBytesPerSec: 0 } })).toBe(true)
    expect(calls.take({ type: 'bandwidthRefused', error: { code: 'ERR_INVALID_ARG', message: 'no migration is running for this guest' } })).toBe(true)
    expect(calls.take({ type: 'resume' })).toBe(false) // not an answer to a call: the guest's
    calls.moved('b:1')
    await expect(first).resolves.toEqual({ precopyBytesPerSec: MiB, postcopyBytesPerSec: 0 })
    await expect(second).rejects.toThrow('no migration is running')
    await expect(third).rejects.toThrow(/ended: its bandwidth can no longer change/)
  })

  it('cancel: asked once however often it is called; resolved by the cancelled failure, refused once moved', async () => {
    const posted: MainToAgent[] = []
    const calls = new MigrationCalls((m) => posted.push(m))
    const a = calls.cancel(true), b = calls.cancel(true)
    expect(posted).toEqual([{ type: 'cancel' }])
    calls.failed(Object.assign(new Error('cancelled'), { code: 'ERR_MIGRATION_CANCELLED' }))
    await expect(Promise.all([a, b])).resolves.toEqual([undefined, undefined])
    const c = calls.cancel(true)
    calls.moved('b:1')
    await expect(c).rejects.toMatchObject({ code: 'ERR_MIGRATION_CANCEL_REFUSED', message: 'cannot cancel: the migration to b:1 is complete' })
  })

  it('preflight: answered in order, the agent held meanwhile; a bad option or a guest that cannot migrate is refused at once; an agent crash answers the rest', async () => {
    const posted: MainToAgent[] = [], held: boolean[] = []
    const calls = new MigrationCalls((m) => posted.push(m), (h) => held.push(h))
    const wire = { to: 'b:1', session: 's1' } as never
    await expect(calls.preflight(() => { throw Object.assign(new Error('this guest moved to b:1'), { code: 'ERR_MIGRATION_BUSY' }) })).rejects.toMatchObject({ code: 'ERR_MIGRATION_BUSY' })
    expect(posted).toEqual([])
    const a = calls.preflight(() => wire), b = calls.preflight(() => wire)
    expect(posted.map((m) => m.type)).toEqual(['preflight', 'preflight'])
    expect(held).toEqual([true])
    const report = { to: 'b:1', migration: 's1' } as never
    expect(calls.take({ type: 'preflightDone', report })).toBe(true)
    expect(held).toEqual([true]) // b still waits
    expect(calls.take({ type: 'preflightFailed', error: { code: 'ERR_MIGRATION_MEMORY', message: 'cannot hold' } })).toBe(true)
    expect(held).toEqual([true, false])
    await expect(a).resolves.toBe(report)
    await expect(b).rejects.toMatchObject({ code: 'ERR_MIGRATION_MEMORY', message: 'cannot hold' })
    const c = calls.preflight(() => wire)
    calls.agentLost(Object.assign(new Error('migration agent crashed: x'), { code: 'ERR_AGENT' }))
    await expect(c).rejects.toMatchObject({ code: 'ERR_AGENT' })
    expect(held).toEqual([true, false, true, false])
  })
})
