/**
 * The will a destination's agent leaves for its standby (src/agent/destination/takeover.ts): written by the exit
 * watch from the agent's own JSON, read back by the standby, which takes nothing on trust it cannot check.
 */
import { describe, expect, it } from 'vitest'
import { parseWill, SessionNotes } from '../../src/agent/destination/takeover'
import { RecoveryWindow } from '../../src/agent/destination/recovery'
import { systemClock } from '../../src/agent/clock'
import type { NativeUffd } from '../../src/binding'

const uffd = { features: 0x40, ioctls: 0x3c } as unknown as NativeUffd

describe('the will', () => {
  it('exists once the service runs here with recovery on, and goes through JSON whole', () => {
    const notes = new SessionNotes(), recovery = new RecoveryWindow(systemClock)
    recovery.timeoutMs = 60_000
    recovery.resumedAtMs = 1234.5
    expect(notes.will('s1', 'peer:1', uffd, recovery)).toBeUndefined() // no held descriptor yet (before HANDOFF)
    Object.assign(notes, { heldFd: 17, port: 7070, limits: { linkTimeoutMs: 10_000, requestTimeoutMs: 5000 }, postcopy: { nice: 5, forwarded: true } })
    const will = notes.will('s1', 'peer:1', uffd, recovery)!
    expect(will).toEqual({ session: 's1', peer: 'peer:1', port: 7070, uffd: { fd: 17, features: 0x40, ioctls: 0x3c }, limits: { linkTimeoutMs: 10_000, requestTimeoutMs: 5000 }, recoveryTimeoutMs: 60_000, resumedAtMs: 1234.5, postcopyNice: 5, forwarded: true })
    expect(parseWill(JSON.stringify(will))).toEqual(will)
    // recovery off: the source will not come back, so nobody could take over
    recovery.timeoutMs = 0
    expect(notes.will('s1', 'peer:1', uffd, recovery)).toBeUndefined()
    expect(notes.will(undefined, '', uffd, { ...recovery, timeoutMs: 1 } as RecoveryWindow)).toBeUndefined()
  })

  it('refuses what is not one, with ERR_MIGRATION_PROTOCOL', () => {
    for (const bad of ['{}', 'null', 'not json', '{"session":"s","port":-1,"uffd":{"fd":3,"features":0},"recoveryTimeoutMs":1,"limits":{}}', '{"session":"s","port":1,"uffd":{"fd":"3","features":0},"recoveryTimeoutMs":1,"limits":{}}']) {
      expect(() => parseWill(bad), bad).toThrow(expect.objectContaining({ code: 'ERR_MIGRATION_PROTOCOL', message: expect.stringMatching(/the crashed agent's will is not one/) }))
    }
  })
})
