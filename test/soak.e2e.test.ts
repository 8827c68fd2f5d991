/**
 * `npm run soak`, short: the page-store moved back and forth six times through the CLI, each mode twice, each hop
 * started as soon as the last one settled (the old home may still forward clients), every third hop tried and
 * cancelled first, and each receiver's agent crashing in turn (a bug, injected: in post-copy, as the process later
 * pauses as a source, at the restore request, with its will armed before it, in pre-copy). A client follows the
 * service the whole time: every answer checked, none refused (it serve()s). The script checks every page after each
 * hop and each old home's exit; a try that leaves the service at its source is tried again, one on neither host
 * fails it. A second run breaks each hop's link once, at a named frame (a reset that loses HANDOFF, a silence that
 * loses SETTLED, a reset towards the source only as SETTLED passes, a silence during the clock exchange). This keeps
 * the script working and its paths checked in CI.
 */
import { mkdtempSync, readFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterEach, describe, expect, it } from 'vitest'
import { LineProc } from '../src/cli/proc'
import { kernelSkipReason, seeInsideSealedLinks } from './helpers/gate'

const skip = kernelSkipReason()
seeInsideSealedLinks() // (UFFD_MIGRATE_ENCRYPT=1: the relays' frame cues see inside sealed records)
const soak = join(__dirname, '..', 'scripts', 'soak.mjs')
let proc: LineProc | undefined
afterEach(() => proc?.kill())

describe.skipIf(skip)('the soak script', () => {
  it("six hops there and back, two after a cancel, each receiver's agent crashing in turn, each old home SIGTERMed once the service runs at the new one: the service always ends on one host, every page verified, every answer right, none refused", async () => {
    const json = join(mkdtempSync(join(tmpdir(), 'soak-')), 'soak.json')
    const inject = 'agent-crash:postcopy,agent-crash:paused,agent-crash:restore,agent-crash:armed,agent-crash:precopy,none'
    proc = new LineProc(process.execPath, [soak, '--hops', '6', '--mib', '64', '--writes', '2000', '--cancel-every', '3', '--back-at-once', '--inject', inject, '--signal-source', '--json', json])
    const { code } = await proc.waitExit(170_000)
    expect(code, proc.stderr).toBe(0)
    const out = JSON.parse(readFileSync(json, 'utf8')) as {
      rows: { hop: number; route: string; mode: string; injection: string; cancelled: boolean; resumedAtSource: number; sentTwice: number; downtimeMs: number; signalHeld?: string }[]
      client: { requests: number; ok: number; wrong: number; errors: number }
    }
    expect(out.rows.map((r) => `${r.hop} ${r.route} ${r.mode} ${r.injection}`)).toEqual([
      '1 a→b hybrid agent-crash:postcopy', '2 b→a postcopy agent-crash:paused', '3 a→b precopy agent-crash:restore',
      '4 b→a hybrid agent-crash:armed', '5 a→b postcopy agent-crash:precopy', '6 b→a precopy none',
    ])
    for (const r of out.rows) {
      expect(r.sentTwice).toBe(0)
      expect(r.downtimeMs).toBeGreaterThan(0)
      // the old home held its SIGTERM (in the migration, or while it relayed its clients after it) and ended with 0
      // (the soak checks each old home's exit): before, it ended at once, with pages the new home still lacked
      expect(['migration', 'relaying']).toContain(r.signalHeld)
    }
    expect(out.rows[2].cancelled).toBe(true) // (hop 6's cancel may meet its source's pre-copy crash first)
    // hop 4's receiver crashes with its will armed: the service never starts there, its source resumes it, and the
    // next try (the receiver's new agent) moves it
    expect(out.rows[3].resumedAtSource).toBeGreaterThanOrEqual(1)
    expect(out.client.wrong).toBe(0)
    expect(out.client.errors).toBe(0)
    expect(out.client.ok).toBe(out.client.requests)
    expect(out.client.ok).toBeGreaterThan(100)
    expect(proc.lines.join('\n')).toContain(`6 of 6 hops moved and verified; client: ${out.client.requests} requests, ${out.client.ok} checked good, 0 wrong, 0 refused or reset`)
  }, 180_000)

  it('four hops, each link broken once at a named frame: the service always ends on one host, every page verified, every answer right, none refused', async () => {
    const json = join(mkdtempSync(join(tmpdir(), 'soak-')), 'soak.json')
    // (the silences outlast --link-timeout-ms 3000 plus the stuck-peer check's two ticks of 600 ms with room to spare:
    // at 4000 a loaded machine's check came after the silence had ended, once in CI, and hop 2 did not recover)
    const faults = 'reset@HANDOFF-lost,silent:6000@SETTLED-lost,one-sided@SETTLED,silent:6000@CLOCK'
    proc = new LineProc(process.execPath, [soak, '--hops', '4', '--mib', '64', '--writes', '2000', '--back-at-once', '--link-faults', faults, '--json', json])
    const { code } = await proc.waitExit(170_000)
    expect(code, proc.stderr).toBe(0)
    const out = JSON.parse(readFileSync(json, 'utf8')) as {
      rows: { hop: number; mode: string; linkFault: string; linkBroke: boolean; resumedAtSource: number; recoveries: number; sentTwice: number }[]
      client: { requests: number; ok: number; wrong: number; errors: number }
    }
    expect(out.rows.map((r) => `${r.hop} ${r.mode} ${r.linkFault} ${r.linkBroke}`)).toEqual([
      '1 hybrid reset@HANDOFF-lost true', '2 postcopy silent:6000@SETTLED-lost true', '3 precopy one-sided@SETTLED true', '4 hybrid silent:6000@CLOCK true',
    ])
    // HANDOFF lost: it never ran there, so it resumed at its source and moved on the next try; the clock exchange's
    // silence (longer than --link-timeout-ms 3000) fails that try before the hand-off the same way
    expect([out.rows[0].resumedAtSource, out.rows[3].resumedAtSource]).toEqual([1, 1])
    expect(out.rows[1].recoveries).toBeGreaterThanOrEqual(1) // SETTLED lost after the hand-off: the source dials back to learn it
    for (const r of out.rows) expect(r.sentTwice).toBe(0)
    expect([out.client.wrong, out.client.errors]).toEqual([0, 0])
    expect(out.client.ok).toBe(out.client.requests)
    expect(proc.lines.join('\n')).toContain('4 of 4 hops moved and verified')
  }, 180_000)
})
