/**
 * `uffd-migrate list`: every control socket of this host's runtime directory, each guest asked for its status at
 * once; a socket with no process behind it is stale, one whose process does not answer in time is busy. Real Unix
 * sockets in a temporary runtime directory; no kernel feature needed.
 */
import { execFile } from 'node:child_process'
import { promisify } from 'node:util'
import { mkdirSync, mkdtempSync, writeFileSync } from 'node:fs'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { ControlServer, controlDir, controlSocketPath, type ControlledGuest, listGuests } from '../../src/control'

const saved = process.env.XDG_RUNTIME_DIR
beforeAll(() => void (process.env.XDG_RUNTIME_DIR = mkdtempSync(join(tmpdir(), 'control-list-'))))
afterAll(() => void (saved === undefined ? delete process.env.XDG_RUNTIME_DIR : (process.env.XDG_RUNTIME_DIR = saved)))

const guest = (name: string, phase: string, sizeBytes: number): ControlledGuest => ({
  name, phase, restored: false, progress: undefined, lastError: phase === 'failed' ? { code: 'ERR_AGENT', message: 'migration agent crashed: x' } : undefined,
  regions: { r: { name: 'r', sizeBytes } },
  migrate: () => Promise.reject(new Error('not here')), preflight: () => Promise.reject(new Error('not here')), cancel: () => Promise.resolve(), setBandwidth: () => Promise.resolve(),
  on: () => undefined, off: () => undefined,
})

describe('the guests of this host', () => {
  it('answering, stale and busy, by name', async () => {
    expect(await listGuests()).toEqual([]) // no directory yet
    const a = await ControlServer.start(guest('alpha', 'idle', 64 << 20))
    const c = await ControlServer.start(guest('gamma', 'failed', 1 << 30))
    mkdirSync(controlDir(), { recursive: true })
    writeFileSync(controlSocketPath('beta'), '') // left behind by a process that died
    const mute = createServer(() => {}).listen(controlSocketPath('delta')) // accepts, never answers
    await new Promise((r) => mute.once('listening', r))
    try {
      const got = await listGuests(300)
      expect(got.map((g) => [g.name, g.state, g.status?.phase])).toEqual([
        ['alpha', 'answering', 'idle'], ['beta', 'stale', undefined], ['delta', 'busy', undefined], ['gamma', 'answering', 'failed'],
      ])
      // the CLI's table, as an operator reads it
      // (not spawnSync: the guests' control servers answer from this process); status of the mute one, meanwhile
      const run = (args: string[]) => promisify(execFile)(process.execPath, [join(__dirname, '..', '..', 'bin', 'uffd-migrate.js'), ...args], { encoding: 'utf8', env: process.env, timeout: 20_000 })
      const [cli, mutedStatus] = await Promise.all([run(['list']), run(['status', '--guest', 'delta']).then(() => undefined, (err: { code: number; stderr: string }) => err)])
      // a guest whose thread cannot answer fails status after 5 s instead of hanging the operator's shell
      expect(mutedStatus?.code).toBe(1)
      expect(mutedStatus?.stderr).toMatch(/guest 'delta' did not answer within 5 s: its main thread is busy or blocked .* \[ERR_UFFD_MIGRATE\]/)
      const lines = cli.stdout.trimEnd().split('\n')
      expect(lines[0]).toMatch(/^NAME +PID +PHASE +MEMORY$/)
      expect(lines[1]).toMatch(new RegExp(`^alpha +${process.pid} +idle +64\\.0 MiB$`))
      expect(lines[2]).toMatch(/^beta +- +stale: no process \(its next Guest\.start replaces it\) +-$/)
      expect(lines[3]).toMatch(/^delta +- +no answer within 2 s/)
      expect(lines[4]).toMatch(new RegExp(`^gamma +${process.pid} +failed +1\\.0 GiB +last: migration agent crashed: x$`))
    } finally {
      a.close()
      c.close()
      mute.close()
    }
  })
})
