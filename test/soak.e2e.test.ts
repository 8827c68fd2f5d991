/**
 * `npm run soak`, short: the page-store moved back and forth six times through the CLI, each mode twice, every
 * third hop tried and cancelled first, each hop started as soon as the last one settled (the old home may still
 * forward clients). A client follows the service the whole time: every answer checked, none refused (it serve()s).
 * The script itself checks every page after each hop and each old home's exit; this keeps it working.
 */
import { mkdtempSync, readFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterEach, describe, expect, it } from 'vitest'
import { LineProc } from '../src/cli/proc'
import { kernelSkipReason } from './helpers/gate'

const skip = kernelSkipReason()
const soak = join(__dirname, '..', 'scripts', 'soak.mjs')
let proc: LineProc | undefined
afterEach(() => proc?.kill())

describe.skipIf(skip)('the soak script', () => {
  it('six hops there and back, two of them after a cancel: every hop verified, every answer right, none refused', async () => {
    const json = join(mkdtempSync(join(tmpdir(), 'soak-')), 'soak.json')
    proc = new LineProc(process.execPath, [soak, '--hops', '6', '--mib', '64', '--writes', '2000', '--cancel-every', '3', '--back-at-once', '--json', json])
    const { code } = await proc.waitExit(150_000)
    expect(code, proc.stderr).toBe(0)
    const out = JSON.parse(readFileSync(json, 'utf8')) as {
      rows: { hop: number; route: string; mode: string; cancelled: boolean; sentTwice: number; downtimeMs: number }[]
      client: { requests: number; ok: number; wrong: number; errors: number }
    }
    expect(out.rows.map((r) => `${r.hop} ${r.route} ${r.mode}${r.cancelled ? ' after a cancel' : ''}`)).toEqual([
      '1 a→b hybrid', '2 b→a postcopy', '3 a→b precopy after a cancel', '4 b→a hybrid', '5 a→b postcopy', '6 b→a precopy after a cancel',
    ])
    for (const r of out.rows) {
      expect(r.sentTwice).toBe(0)
      expect(r.downtimeMs).toBeGreaterThan(0)
    }
    expect(out.client.wrong).toBe(0)
    expect(out.client.errors).toBe(0)
    expect(out.client.ok).toBe(out.client.requests)
    expect(out.client.ok).toBeGreaterThan(100)
    expect(proc.lines.join('\n')).toContain(`6 of 6 hops moved and verified; client: ${out.client.requests} requests, ${out.client.ok} checked good, 0 wrong, 0 refused or reset`)
  }, 180_000)
})
