/**
 * A bug in the agent is the migration's failure, never the service's: a source whose agent crashed while no migration
 * ran keeps running (it was exiting with code 4, as if it were a destination missing pages), says so once, and a new
 * agent runs its next migration (it used to refuse every one until the service restarted); after MAX_AGENT_RESTARTS
 * new agents every migrate() says why it cannot start, as does a guest that was closed (both used to wait for ever);
 * a receiver's start fails with ERR_AGENT, not a bare Error. The crash is injected (UFFD_MIGRATE_FAULT_INJECT=
 * agent-crash:now, read by the agent's worker as it starts; agent-crash:now+takeover: the new ones too).
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
  it('crashed on an idle source: the service runs on, status says why, and a new agent runs the next migration', async () => {
    const exit = vi.spyOn(process, 'exit').mockImplementation((() => undefined) as never)
    const stderr = vi.spyOn(fs, 'writeSync') // (the log's lines: src/log.ts)
    process.env.UFFD_MIGRATE_FAULT_INJECT = 'agent-crash:now'
    const guest = await Guest.start({ name: `crash-${process.pid}`, regions: { r: 1 << 20 }, control: false, token })
    delete process.env.UFFD_MIGRATE_FAULT_INJECT
    await pollUntil(() => guest.lastError !== undefined, 10_000)
    expect(guest.lastError).toEqual({ code: 'ERR_AGENT', message: 'migration agent crashed: injected by UFFD_MIGRATE_FAULT_INJECT=agent-crash:now' })
    expect(guest.phase).toBe('idle')
    // the new agent dials: nobody listens at port 1, so it fails as a migration fails (not as ERR_AGENT)
    await expect(guest.migrate({ to: '127.0.0.1:1', connectTimeoutMs: 300 })).rejects.toMatchObject({ code: 'ERR_MIGRATION_CONNECT' })
    // its memory is the service's as before
    new Uint8Array(guest.regions.r.buffer)[5] = 7
    expect(new Uint8Array(guest.regions.r.buffer)[5]).toBe(7)
    await new Promise((r) => setTimeout(r, 200)) // an exit would have been scheduled by now (emitOrExit: 50 ms)
    expect(exit).not.toHaveBeenCalled()
    expect(process.exitCode ?? 0).toBe(0)
    const lines = stderr.mock.calls.filter((c) => c[0] === 2).map((c) => String(c[1]))
    expect(lines.filter((l) => /: migration agent crashed: .*; a new agent takes its place \(the service runs on here, and can move again\)/.test(l))).toHaveLength(1)
    await guest.close()
  })

  it('crashed again in each new agent: after 3 new agents none is started, status says failed, migrate() is refused with ERR_AGENT', async () => {
    process.env.UFFD_MIGRATE_FAULT_INJECT = 'agent-crash:now+takeover'
    const guest = await Guest.start({ name: `crash3-${process.pid}`, regions: { r: 1 << 20 }, control: false, token })
    await pollUntil(() => guest.phase === 'failed', 20_000)
    delete process.env.UFFD_MIGRATE_FAULT_INJECT
    expect(guest.phase).toBe('failed')
    await expect(guest.migrate({ to: '127.0.0.1:1' })).rejects.toMatchObject({ code: 'ERR_AGENT', message: expect.stringMatching(/\(the new agent\); no migration can start from this process now: restart the service/) })
    new Uint8Array(guest.regions.r.buffer)[5] = 7 // its memory is the service's as before
    expect(new Uint8Array(guest.regions.r.buffer)[5]).toBe(7)
    await guest.close()
  })

  it('crashed on a receiver before any hand-off, in every new agent too: Guest.start() rejects with ERR_AGENT, not a bare Error', async () => {
    // (one crash alone gets a new agent: test/agent-takeover.e2e.test.ts)
    process.env.UFFD_MIGRATE_FAULT_INJECT = 'agent-crash:now+takeover'
    const starting = Guest.start({ name: `crash-rx-${process.pid}`, regions: { r: 1 << 20 }, control: false, token, receive: `127.0.0.1:${await freePort()}` })
    await expect(starting).rejects.toMatchObject({
      code: 'ERR_AGENT', message: expect.stringMatching(/^migration agent crashed before the hand-off: injected by UFFD_MIGRATE_FAULT_INJECT=agent-crash:now(\+takeover \(the new agent\))?; the service runs on at the source$/),
    })
  })

  it('closed: migrate() is refused at once instead of waiting for ever', async () => {
    const guest = await Guest.start({ name: `closed-${process.pid}`, regions: { r: 1 << 20 }, control: false, token })
    await guest.close()
    await expect(guest.migrate({ to: '127.0.0.1:1' })).rejects.toMatchObject({ code: 'ERR_INVALID_ARG', message: expect.stringMatching(/is closed \(guest\.close\(\)\)/) })
    await expect(guest.cancel()).rejects.toMatchObject({ code: 'ERR_INVALID_ARG' })
  })
})
