/**
 * UFFD_MIGRATE_LOG_FORMAT=json on both hosts: every line either side's service writes on stderr is one JSON object,
 * and their events tell the migration's turns in order (a log pipeline alerts on them). Real processes, real TCP.
 */
import { afterEach, describe, expect, it } from 'vitest'
import { freePort } from '../src/cli/proc'
import { kernelSkipReason } from './helpers/gate'
import { host, killAll, listening, page, sendAndWait, sendFailure } from './helpers/hosts'

const skip = kernelSkipReason()

afterEach(killAll)

interface Line { time: string; level: string; guest: string; pid: number; migration?: string; event: string; msg: string }
const lines = (stderr: string) => stderr.split('\n').filter((l) => l !== '').map((l) => JSON.parse(l) as Line)

describe.skipIf(skip)('JSON log lines', () => {
  it('a migration there: the source says migration-began, handed-off, moved; the destination listening, incoming, resumed, settled', async () => {
    const A = host('a'), B = host('b')
    A.env.UFFD_MIGRATE_LOG_FORMAT = B.env.UFFD_MIGRATE_LOG_FORMAT = 'json'
    const g = `jsonlog-${process.pid}`, port = await freePort(), http = await freePort()
    const dst = B.receive(g, port, http)
    await listening(dst)
    const src = A.service(g, await freePort())
    await src.waitLine(/^READY/)
    const { code, send, report } = await sendAndWait(A, g, port, ['--mode', 'postcopy'])
    expect(code, sendFailure(send, dst)).toBe(0)
    expect((await dst.waitLine(/^VERIFY (.*)$/, 60_000))[1]).toBe('ok pages=16384')
    expect((await page(http, 1)).ok).toBe(true)
    expect((await src.exited).code).toBe(0)
    const s = lines(src.stderr), d = lines(dst.stderr)
    expect(s.map((l) => l.event)).toEqual(['migration-began', 'handed-off', 'moved'])
    expect(d.map((l) => l.event)).toEqual(['listening', 'incoming', 'resumed', 'settled'])
    for (const l of [...s, ...d]) {
      expect(l.guest).toBe(g)
      expect(l.level).toBe('info')
      expect(Number.isInteger(l.pid)).toBe(true)
      expect(Date.parse(l.time)).toBeGreaterThan(Date.parse('2026-01-01'))
    }
    expect(s[2].msg).toMatch(/^moved to 127\.0\.0\.1:\d+: settled there; downtime [\d.]+ ms, total \d+ ms$/)
    expect(d[0].pid).not.toBe(s[0].pid)
    // one migration id on both hosts' lines about it (not on the receiver's 'listening', before any source came), in the
    // text of the began lines, and in the report
    const id = s[0].migration
    expect(id).toMatch(/^[0-9a-f]{24}$/)
    expect([...s, ...d.slice(1)].map((l) => l.migration)).toEqual(Array(s.length + d.length - 1).fill(id))
    expect(d[0].migration).toBeUndefined()
    expect(s[0].msg).toContain(`(migration ${id}, mode postcopy)`)
    expect(d[1].msg).toMatch(new RegExp(`began \\(migration ${id}(, encrypted)?\\)`)) // (encrypted: a run with UFFD_MIGRATE_ENCRYPT=1)
    expect(report?.migration).toBe(id)
  }, 60_000)

  it('a destination that cannot place pages (UFFD_MIGRATE_FAULT_INJECT=install:3): each side logs the destination\'s reason, and the service runs on at its source', async () => {
    const A = host('a'), B = host('b')
    A.env.UFFD_MIGRATE_LOG_FORMAT = B.env.UFFD_MIGRATE_LOG_FORMAT = 'json'
    B.env.UFFD_MIGRATE_FAULT_INJECT = 'install:3'
    const g = `jsonlog-nomem-${process.pid}`, port = await freePort(), http = await freePort(), srcHttp = await freePort()
    const dst = B.receive(g, port, http)
    await listening(dst)
    const src = A.service(g, srcHttp)
    await src.waitLine(/^READY/)
    const { code, send } = await sendAndWait(A, g, port, ['--mode', 'precopy'])
    expect(code, sendFailure(send, dst)).toBe(1)
    const reason = /the destination could not place \d+ page\(s\) of region 0 from page \d+: ENOMEM: the destination is out of memory/
    expect(send.stderr).toMatch(reason) // (not "urgent connection closed by the peer": whichever connection ends first)
    const s = lines(src.stderr), d = lines(dst.stderr)
    expect(s.map((l) => l.event)).toEqual(['migration-began', 'migration-failed'])
    expect(s[1].msg).toMatch(reason)
    expect(s[1].msg).toMatch(/\[ERR_MIGRATION_ABORTED\]/)
    expect(d.map((l) => l.event)).toEqual(['listening', 'incoming', 'session-ended'])
    expect(d[2].msg).toMatch(reason)
    // the same migration's lines, both hosts, and send's answer
    expect([...s, ...d.slice(1)].map((l) => l.migration)).toEqual(Array(s.length + d.length - 1).fill(JSON.parse(send.lines.join('\n')).migration))
    expect(s[0].migration).toMatch(/^[0-9a-f]{24}$/)
    expect((await page(srcHttp, 1)).ok).toBe(true) // the service runs on here
  }, 60_000)
})
