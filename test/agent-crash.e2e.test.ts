/**
 * A bug in the agent is the migration's failure, never the service's: a source whose agent crashed while no migration
 * ran keeps running (it was exiting with code 4, as if it were a destination missing pages), says so once, and every
 * later migrate() says why it cannot start, as does a guest that was closed (both used to wait for ever); a receiver's
 * start fails with ERR_AGENT, not a bare Error. The crash
 * is injected (UFFD_MIGRATE_FAULT_INJECT=agent-crash:now, read by the agent's worker as it starts).
 */
import fs from 'node:fs'
import { afterEach, describe, expect, it, vi } from 'vitest'
import { freePort } from '../src/cli/proc'
import { Guest } from '../src/guest'
import { kernelSkipReason } from './helpers/gate'
import { pollUntil } from './helpers/wait'

const skip = kernelSkipReason()
const token = 'x'.repeat(32)

afterEach(() => {
  delete process.env.UFFD_MIGRATE_FAULT_INJECT
  vi.restoreAllMocks()
})

describe.skipIf(skip)('an agent that is gone', () => {
  it('crashed on an idle source: the service runs on, status says failed and why, migrate() is refused with ERR_AGENT', async () => {
    const exit = vi.spyOn(process, 'exit').mockImplementation((() => undefined) as never)
    const stderr = vi.spyOn(fs, 'writeSync') // (the log's lines: src/log.ts)
    process.env.UFFD_MIGRATE_FAULT_INJECT = 'agent-crash:now'
    const guest = await Guest.start({ name: `crash-${process.pid}`, regions: { r: 1 << 20 }, control: false, token })
    delete process.env.UFFD_MIGRATE_FAULT_INJECT
    await pollUntil(() => guest.phase === 'failed', 10_000)
    expect(guest.phase).toBe('failed')
    expect(guest.lastError).toEqual({ code: 'ERR_AGENT', message: 'migration agent crashed: injected by UFFD_MIGRATE_FAULT_INJECT=agent-crash:now' })
    await expect(guest.migrate({ to: '127.0.0.1:1' })).rejects.toMatchObject({ code: 'ERR_AGENT', message: expect.stringMatching(/no migration can start from this process now: restart the service/) })
    // its memory is the service's as before
    new Uint8Array(guest.regions.r.buffer)[5] = 7
    expect(new Uint8Array(guest.regions.r.buffer)[5]).toBe(7)
    await new Promise((r) => setTimeout(r, 200)) // an exit would have been scheduled by now (emitOrExit: 50 ms)
    expect(exit).not.toHaveBeenCalled()
    expect(process.exitCode ?? 0).toBe(0)
    expect(stderr.mock.calls.filter((c) => c[0] === 2).map((c) => String(c[1])).filter((l) => l.includes('migration agent crashed'))).toHaveLength(1)
    await guest.close()
  })

  it('crashed on a receiver before any hand-off: Guest.start() rejects with ERR_AGENT, not a bare Error', async () => {
    process.env.UFFD_MIGRATE_FAULT_INJECT = 'agent-crash:now'
    const starting = Guest.start({ name: `crash-rx-${process.pid}`, regions: { r: 1 << 20 }, control: false, token, receive: `127.0.0.1:${await freePort()}` })
    await expect(starting).rejects.toMatchObject({
      code: 'ERR_AGENT', message: 'migration agent crashed before the hand-off: injected by UFFD_MIGRATE_FAULT_INJECT=agent-crash:now; the service runs on at the source',
    })
  })

  it('closed: migrate() is refused at once instead of waiting for ever', async () => {
    const guest = await Guest.start({ name: `closed-${process.pid}`, regions: { r: 1 << 20 }, control: false, token })
    await guest.close()
    await expect(guest.migrate({ to: '127.0.0.1:1' })).rejects.toMatchObject({ code: 'ERR_INVALID_ARG', message: expect.stringMatching(/is closed \(guest\.close\(\)\)/) })
    await expect(guest.cancel()).rejects.toMatchObject({ code: 'ERR_INVALID_ARG' })
  })
})
