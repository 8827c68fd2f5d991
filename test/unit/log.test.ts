/** The operator's log lines: text as before, or one JSON object per line with a stable event name (src/log.ts). */
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { formatLog, LOG_EVENTS, logFormat } from '../../src/log'

describe('log lines', () => {
  const at = new Date('2026-11-27T23:40:00.123Z')

  it('text: the prefix and the words, as the README shows them', () => {
    expect(formatLog('text', 'shop', 'moved', 'moved to h:7070: settled there', 'info', at, 42)).toBe("uffd-migrate: guest 'shop': moved to h:7070: settled there\n")
  })

  it('json: one object per line, with the time, level, guest, pid, event and words; no time when composed for later', () => {
    const line = formatLog('json', 'shop', 'link-broken', 'the link to h:7070 broke "now"', 'warn', at, 42)
    expect(line.endsWith('\n')).toBe(true)
    expect(line.trimEnd()).not.toContain('\n')
    expect(JSON.parse(line)).toEqual({ time: '2026-11-27T23:40:00.123Z', level: 'warn', guest: 'shop', pid: 42, event: 'link-broken', msg: 'the link to h:7070 broke "now"' })
    expect(JSON.parse(formatLog('json', 'shop', 'exiting', 'x', 'error', null, 42))).toEqual({ level: 'error', guest: 'shop', pid: 42, event: 'exiting', msg: 'x' })
  })

  it('json: a line about a migration carries its id (both hosts log the same one); text lines do not change', () => {
    const id = '0123456789abcdef01234567'
    expect(JSON.parse(formatLog('json', 'shop', 'resumed', 'the service runs here', 'info', at, 42, id))).toEqual({
      time: '2026-11-27T23:40:00.123Z', level: 'info', guest: 'shop', pid: 42, migration: id, event: 'resumed', msg: 'the service runs here',
    })
    expect(formatLog('text', 'shop', 'resumed', 'the service runs here', 'info', at, 42, id)).toBe("uffd-migrate: guest 'shop': the service runs here\n")
  })

  it('UFFD_MIGRATE_LOG_FORMAT=json turns it on; anything else is text', () => {
    expect(logFormat({ UFFD_MIGRATE_LOG_FORMAT: 'json' })).toBe('json')
    expect(logFormat({})).toBe('text')
    expect(logFormat({ UFFD_MIGRATE_LOG_FORMAT: 'JSON ' })).toBe('text')
  })

  it('the README names every event', () => {
    const readme = readFileSync(join(__dirname, '..', '..', 'README.md'), 'utf8')
    for (const e of LOG_EVENTS) expect(readme, e).toContain(`\`${e}\``)
  })
})
