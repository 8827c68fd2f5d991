/** The operator's log lines (src/agent/log-lines.ts): what each turn of a migration says, with its figures. */
import { describe, expect, it } from 'vitest'
import { agentTrouble, destinationLine, destinationTrouble, sourceLine } from '../../src/agent/log-lines'
import type { MigrationReport } from '../../src/agent/report'
import { deferredLogLine } from '../../src/log'

const regions = [{ sizeBytes: 64 << 20, pageCount: 16384 }, { sizeBytes: 1 << 20, pageCount: 256 }]

describe('destination lines', () => {
  it('name the source, the sizes and the pages still to come', () => {
    expect(destinationLine({ kind: 'began', peer: '10.0.0.1:40000' }, regions)).toBe('a migration from 10.0.0.1:40000 began: 65.0 MiB in 2 region(s)')
    expect(destinationLine({ kind: 'began', peer: '10.0.0.1:40000', migration: '0a1b2c' }, regions)).toBe('a migration from 10.0.0.1:40000 began (migration 0a1b2c): 65.0 MiB in 2 region(s)')
    expect(destinationLine({ kind: 'resumed', peer: '10.0.0.1:40000', afterHandoffMs: 2.25, pagesLeft: 5 }, regions)).toBe(
      'the service runs here (2.3 ms after the hand-off arrived); 5 of 16640 pages still to come from 10.0.0.1:40000 (post-copy)',
    )
    expect(destinationLine({ kind: 'resumed', peer: 'p', afterHandoffMs: 1, pagesLeft: 0 }, regions)).toMatch(/; every page is here$/)
    expect(destinationLine({ kind: 'back', brokenMs: 812.4, pagesLeft: 99 }, regions)).toBe('the source came back after 812 ms; post-copy goes on (99 pages to come)')
  })

  it('settled: the fault figures only when there were faults', () => {
    expect(destinationLine({ kind: 'settled', afterResumeMs: 40.6, networkFaults: 3, p99Us: 211.7 }, regions)).toBe(
      'settled: every page is here, 41 ms after the service resumed (3 fault(s) fetched over the network, p99 212 us); the guest can move on',
    )
    expect(destinationLine({ kind: 'settled', afterResumeMs: 4, networkFaults: 0, p99Us: 0 }, regions)).toBe(
      'settled: every page is here, 4 ms after the service resumed (0 fault(s) fetched over the network); the guest can move on',
    )
    expect(destinationLine({ kind: 'settled', afterResumeMs: 90, networkFaults: 0, p99Us: 0, recoveries: 2, protocolBreaks: 1 }, regions)).toBe(
      'settled: every page is here, 90 ms after the service resumed (0 fault(s) fetched over the network; the link recovered 2x, 1 after a malformed frame); the guest can move on',
    )
  })
})

describe('source lines', () => {
  it('a line for the hand-off, a broken link and its return; none for the other phase changes', () => {
    const at = (from: string, to: string) => sourceLine.phase('h:7070', from, to, 60000)
    expect(at('precopy', 'handoff')).toBeUndefined()
    expect(at('connect', 'precopy')).toBeUndefined()
    expect(at('postcopy', 'settled')).toBeUndefined()
    expect(at('handoff', 'postcopy')?.[0]).toBe('handed-off')
    expect(at('handoff', 'postcopy')?.[1]).toMatch(/^handed off to h:7070: the service runs there now/)
    expect(at('postcopy', 'recovering')).toEqual(['link-broken', 'the link to h:7070 broke after the hand-off; dialling it again for up to 60000 ms', 'warn'])
    expect(at('recovering', 'postcopy')).toEqual(['link-back', 'the link to h:7070 is back; post-copy goes on', 'info'])
    // with its cause, when the source knows it (a stuck destination is not a reset)
    expect(sourceLine.phase('h:7070', 'postcopy', 'recovering', 60000, 'the destination looks stuck: nothing arrived from it for 2000 ms')?.[1])
      .toBe('the link to h:7070 broke after the hand-off (the destination looks stuck: nothing arrived from it for 2000 ms); dialling it again for up to 60000 ms')
  })

  it('the start names the bandwidth limits when there are any, and a change of them gets a line', () => {
    expect(sourceLine.began('h:7070', 'hybrid')).toBe('a migration to h:7070 began (mode hybrid)')
    expect(sourceLine.began('h:7070', 'hybrid', undefined, undefined, '0a1b2c')).toBe('a migration to h:7070 began (migration 0a1b2c, mode hybrid)')
    expect(sourceLine.began('h:7070', 'hybrid', { precopyBytesPerSec: 0, postcopyBytesPerSec: 0 })).toBe('a migration to h:7070 began (mode hybrid)')
    expect(sourceLine.began('h:7070', 'precopy', { precopyBytesPerSec: 64 << 20, postcopyBytesPerSec: 0 })).toBe(
      'a migration to h:7070 began (mode precopy; bandwidth limits: pre-copy 64.0 MiB/s, post-copy push no limit)',
    )
    expect(sourceLine.began('h:7070', 'precopy', { precopyBytesPerSec: 16 << 20, postcopyBytesPerSec: 0 }, 1 << 30)).toBe(
      'a migration to h:7070 began (mode precopy; bandwidth limits: pre-copy 16.0 MiB/s, post-copy push no limit; pre-copy converges against a switchover bandwidth of 1.0 GiB/s)',
    )
    expect(sourceLine.limits('h:7070', { precopyBytesPerSec: 0, postcopyBytesPerSec: 1 << 30 })).toBe(
      'the migration to h:7070 now runs with bandwidth limits: pre-copy no limit, post-copy push 1.0 GiB/s',
    )
  })

  it('moved and failed say where the service runs now', () => {
    expect(sourceLine.moved('h:7070', { downtimeMs: 3.14, totalMs: 79.4 } as MigrationReport)).toBe('moved to h:7070: settled there; downtime 3.1 ms, total 79 ms')
    expect(sourceLine.failed('h:7070', { code: 'ERR_MIGRATION_CONNECT', message: 'refused' })).toBe(
      'the migration to h:7070 failed: refused [ERR_MIGRATION_CONNECT]; the service runs on here',
    )
    expect(sourceLine.failed('h:7070', { code: 'ERR_MIGRATION_CANCELLED', message: 'migration to h:7070 cancelled in phase precopy (round 1), before the hand-off: the service runs on here' })).toBe(
      'the migration to h:7070 was cancelled: migration to h:7070 cancelled in phase precopy (round 1), before the hand-off: the service runs on here [ERR_MIGRATION_CANCELLED]',
    )
    expect(sourceLine.failed('h:7070', { code: 'ERR_MIGRATION_CONNECTION', message: 'gone', afterHandoff: true })).toMatch(/; after the hand-off: the service does not run here$/)
  })
})

describe('trouble lines', () => {
  it('a failure at the destination says where the service runs and what is lost', () => {
    expect(destinationTrouble.failed({ code: 'ERR_MIGRATION_HANDOFF', message: 'could not decode the hand-off state: bad' }))
      .toBe('the migration ended at the hand-off: could not decode the hand-off state: bad [ERR_MIGRATION_HANDOFF]; the service runs on at the source')
    expect(destinationTrouble.failed({ code: 'ERR_MIGRATION_CONNECTION', message: 'gone' }))
      .toBe('the migration failed after the hand-off: gone [ERR_MIGRATION_CONNECTION]; the pages that had not arrived cannot come now')
    expect(destinationTrouble.sessionEnded({ message: 'closed' })).toBe('a migration ended before the hand-off (closed) [ERR_UFFD_MIGRATE]; listening for the next source')
  })

  it("the exit watch's line is whole (a native thread writes it as it is) and names the guest, the wait and the code", () => {
    expect(deferredLogLine('kv', 'exiting', destinationTrouble.notTaken('the migration agent ended before every page arrived', 3000, 4), 'error')).toBe(
      "uffd-migrate: guest 'kv': the migration agent ended before every page arrived, and the service's main thread did not take the failure " +
        'within 3000 ms (it waits for a page that cannot arrive now): ending the process with exit code 4\n',
    )
    const err = new Error('boom')
    expect(agentTrouble.crashed(err)).toMatch(/^the migration agent crashed: Error: boom\n {4}at /)
    expect(agentTrouble.crashed('a string')).toBe('the migration agent crashed: a string')
  })
})

describe('preflight lines', () => {
  it('a preflight that failed a check on the destination says so, and that nothing moved', () => {
    expect(destinationTrouble.preflightFailed({ code: 'ERR_MIGRATION_MEMORY', message: 'the destination cannot hold this guest' })).toBe(
      'a preflight check failed here: the destination cannot hold this guest [ERR_MIGRATION_MEMORY]; nothing moved, listening for the next source',
    )
  })
})

