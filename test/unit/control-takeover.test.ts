/**
 * The control socket's name on a host: a guest that moved away (its process
 * lives on while its forwarder relays clients) gives the name to the guest of
 * that name that runs here again (it came back), and its own exit does not
 * remove the newcomer's socket. Any other live holder keeps it. Real Unix
 * sockets in a temporary runtime directory; no kernel feature needed.
 */
import { spawnSync } from 'node:child_process'
import { existsSync, mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { ControlServer, controlRequest, controlSocketPath, type ControlledGuest } from '../../src/control'

const saved = process.env.XDG_RUNTIME_DIR
beforeAll(() => void (process.env.XDG_RUNTIME_DIR = mkdtempSync(join(tmpdir(), 'control-'))))
afterAll(() => void (saved === undefined ? delete process.env.XDG_RUNTIME_DIR : (process.env.XDG_RUNTIME_DIR = saved)))

function guest(name: string, phase: string): ControlledGuest {
  return {
    name, phase, restored: phase !== 'moved', progress: undefined, lastError: undefined, regions: {},
    migrate: () => Promise.reject(new Error('not here')), preflight: () => Promise.reject(new Error('not here')), cancel: () => Promise.resolve(), setBandwidth: () => Promise.resolve(),
    on: () => undefined, off: () => undefined,
  }
}

function status(name: string): Promise<{ phase: string; pid: number }> {
  let out: { phase: string; pid: number } | undefined
  return controlRequest(controlSocketPath(name), { cmd: 'status' }, (m) => void (out = m as never)).then(() => out!)
}

describe('the control socket of a guest that came back', () => {
  it('a moved holder gives the name to the guest that runs here now, and its exit leaves the newcomer reachable', async () => {
    const old = await ControlServer.start(guest('svc', 'moved'))
    // a moved guest refuses nothing but release; a guest that runs keeps its name
    const refused: Record<string, unknown>[] = []
    const runs = await ControlServer.start(guest('busy', 'idle'))
    await controlRequest(controlSocketPath('busy'), { cmd: 'release' }, (m) => void refused.push(m))
    expect(refused).toEqual([{ type: 'error', code: 'ERR_MIGRATION_BUSY', message: "guest 'busy' runs here (idle): it keeps its name" }])
    expect((await status('busy')).phase).toBe('idle')
    runs.close()
    expect((await status('svc')).phase).toBe('moved')
    const back = await ControlServer.start(guest('svc', 'settled'))
    expect((await status('svc')).phase).toBe('settled')
    old.close() // the forwarder's process exits later
    expect((await status('svc')).phase).toBe('settled')
    back.close()
    await expect(status('svc')).rejects.toMatchObject({ code: 'ENOENT' })
  })

  it('any other live holder keeps it: a second guest of that name is refused (ERR_MIGRATION_BUSY)', async () => {
    const first = await ControlServer.start(guest('dup', 'idle'))
    await expect(ControlServer.start(guest('dup', 'idle'))).rejects.toMatchObject({ code: 'ERR_MIGRATION_BUSY', message: expect.stringMatching(/already running here .*idle/) })
    expect((await status('dup')).phase).toBe('idle')
    first.close()
  })

  it('a stale socket file (its process was killed) is no holder', async () => {
    const path = controlSocketPath('stale')
    spawnSync(process.execPath, ['-e', `require('net').createServer().listen(${JSON.stringify(path)}, () => process.kill(process.pid, 'SIGKILL'))`])
    expect(existsSync(path)).toBe(true)
    const fresh = await ControlServer.start(guest('stale', 'idle'))
    expect((await status('stale')).pid).toBe(process.pid)
    fresh.close()
  })
})
