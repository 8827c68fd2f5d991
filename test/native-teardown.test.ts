/**
 * The addon when its environment goes away: a worker terminated while it
 * calls into the addon (guest.close() during a batch of native events), and
 * constructors that throw. Each case runs in a child process of its own,
 * because the failure it guards against is an abort of the whole process;
 * and the exit watch, which ends the process itself when it must.
 */
import { spawnSync } from 'node:child_process'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'

const root = join(__dirname, '..')
const load = `require('node-gyp-build')(${JSON.stringify(root)})`

function runChild(script: string): { status: number | null; signal: string | null; out: string } {
  const r = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8', timeout: 60_000 })
  return { status: r.status, signal: r.signal, out: `${r.stdout}${r.stderr}`.slice(-2000) }
}

describe('the addon as its environment goes away', () => {
  it('a worker terminated while addon calls throw ends quietly (no C++ terminate, no abort)', () => {
    // Without NODE_API_SWALLOW_UNTHROWABLE_EXCEPTIONS the error of a call made as the worker stops cannot be
    // thrown into JS, and the C++ exception aborts the process (seen in CI: a bulk reader closed as its guest closed).
    const r = runChild(`
      const { Worker } = require('node:worker_threads')
      const code = "const b = ${load.replace(/"/g, '\\"')}; require('node:worker_threads').parentPort.postMessage('up'); for (;;) { try { new b.BulkWriter() } catch {} }"
      ;(async () => {
        for (let i = 0; i < 30; i++) {
          const w = new Worker(code, { eval: true })
          await new Promise((r) => w.once('message', r))
          await new Promise((r) => setTimeout(r, 5 + (i % 7)))
          await w.terminate()
        }
        console.log('terminated 30 workers')
      })()
    `)
    expect(r.out).not.toMatch(/terminate called|Assertion failed/)
    expect([r.status, r.signal, r.out.trim()]).toEqual([0, null, 'terminated 30 workers'])
  })

  it('a native thread whose constructor throws leaves no cleanup hook behind', () => {
    // The hook registered before the arguments were checked outlived the object: the next object at the same
    // address could not register its own (node's CleanupQueue assertion), and teardown would call freed memory.
    const r = runChild(`
      const b = ${load}
      let refused = 0
      for (let i = 0; i < 200; i++) {
        try { new b.BulkWriter() } catch (e) { if (e instanceof TypeError) refused++ }
        try { new b.BulkReader() } catch (e) { if (e instanceof TypeError) refused++ }
      }
      console.log('refused ' + refused)
    `)
    expect(r.out).not.toMatch(/Assertion failed/)
    expect([r.status, r.signal, r.out.trim()]).toEqual([0, null, 'refused 400'])
  })
})

describe('the exit watch (native/exit_watch.cc): a destination whose service thread waits for ever', () => {
  // The child: a watch armed in a worker (as the agent arms it at the hand-off); `then` runs in the worker after
  // arming; the main thread then blocks for `blockMs` (a thread in a fault that never resolves) unless told not to.
  const child = (then: string, main: { blockMs: number; onError?: string }) => `
    const { Worker } = require('node:worker_threads')
    const b = ${load}
    const id = b.exitWatchCreate()
    const w = new Worker("const b = ${load.replace(/"/g, '\\"')}; const { workerData: id, parentPort } = require('node:worker_threads'); b.exitWatchArm(id, 4, 200, 'watch: agent ended\\\\n'); ${then}; parentPort.postMessage('armed')", { eval: true, workerData: id })
    w.on('error', () => { ${main.onError ?? ''} })
    w.once('message', () => {
      ${main.blockMs ? `Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ${main.blockMs}); console.log('main ran on')` : ''}
    })
    setTimeout(() => console.log('main still here'), ${main.blockMs + 800})
  `

  it('armed, the agent crashes, the main thread never takes it: the process ends with the code and the line', () => {
    const r = runChild(child(`setTimeout(() => { throw new Error('agent bug') }, 10)`, { blockMs: 20_000 }))
    expect([r.status, r.signal]).toEqual([4, null])
    expect(r.out).toContain('watch: agent ended')
    expect(r.out).not.toContain('main ran on')
  })

  it('armed, the agent crashes, the main thread takes it: the process goes on', () => {
    const r = runChild(child(`setTimeout(() => { throw new Error('agent bug') }, 10)`, { blockMs: 0, onError: 'b.exitWatchTake(id)' }))
    expect([r.status, r.signal]).toEqual([0, null])
    expect(r.out).toContain('main still here')
    expect(r.out).not.toContain('watch: agent ended')
  })

  it('disarmed while counting (a receiver whose agent crashed before the service started): the countdown ends, the process goes on', () => {
    const r = runChild(child(`setTimeout(() => { throw new Error('agent bug') }, 10)`, { blockMs: 0, onError: 'b.exitWatchDisarm(id)' }))
    expect([r.status, r.signal]).toEqual([0, null])
    expect(r.out).toContain('main still here')
    expect(r.out).not.toContain('watch: agent ended')
  })

  it('disarmed (settled) before the agent ends: nothing is ended', () => {
    const r = runChild(child(`b.exitWatchDisarm(id); setTimeout(() => { throw new Error('agent bug') }, 10)`, { blockMs: 600 }))
    expect([r.status, r.signal]).toEqual([0, null])
    expect(r.out).toContain('main ran on')
    expect(r.out).not.toContain('watch: agent ended')
  })

  // A standby (src/agent/destination/takeover.ts): it waits on exitWatchSucceed()'s socket, takes the will that the
  // watch writes there when the armed agent ends, and arms the watch itself, which stops the countdown.
  const succession = (o: { standbyAfterMs: number; countdownMs: number; rearm: boolean }) => `
    const { Worker } = require('node:worker_threads')
    const b = ${load}
    const id = b.exitWatchCreate()
    const standby = "const b = ${load.replace(/"/g, '\\"')}; const { workerData: id } = require('node:worker_threads'); const fs = require('node:fs');" +
      "const s = new (require('node:net').Socket)({ fd: b.exitWatchSucceed(id), readable: true, writable: false }); let t = '';" +
      "s.on('data', (c) => (t += c)); s.on('end', () => { s.destroy(); fs.writeSync(1, 'standby got [' + t.trim() + ']\\\\n'); ${o.rearm ? "b.exitWatchArm(id, 4, 200, 'watch: standby ended\\\\n', 'W2'); setInterval(() => {}, 1000)" : ''} })"
    const agent = new Worker("const b = ${load.replace(/"/g, '\\"')}; const { workerData: id, parentPort } = require('node:worker_threads'); b.exitWatchBind(id); b.exitWatchArm(id, 4, ${o.countdownMs}, 'watch: agent ended\\\\n', '{\\"will\\":1}'); parentPort.postMessage('armed'); setTimeout(() => { throw new Error('agent bug') }, 50)", { eval: true, workerData: id })
    agent.on('error', () => {})
    agent.once('message', () => {
      setTimeout(() => new Worker(standby, { eval: true, workerData: id }), ${o.standbyAfterMs})
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ${o.standbyAfterMs} + 10) // (the standby's start is queued: it runs after)
      setTimeout(() => (console.log('main ran on'), b.exitWatchTake(id), process.exit(0)), 1500) // (the standby lives on)
    })
  `

  it('a standby gets the will as the armed agent ends and stops the countdown by arming it again; one that starts after the end gets it too', () => {
    const waiting = runChild(succession({ standbyAfterMs: 0, countdownMs: 1000, rearm: true }))
    expect([waiting.status, waiting.signal], waiting.out).toEqual([0, null])
    expect(waiting.out.trim().split('\n')).toEqual(['standby got [{"will":1}]', 'main ran on'])
    const late = runChild(succession({ standbyAfterMs: 300, countdownMs: 1000, rearm: true }))
    expect([late.status, late.signal], late.out).toEqual([0, null])
    expect(late.out.trim().split('\n')).toEqual(['standby got [{"will":1}]', 'main ran on'])
    // a standby that does not arm it: the countdown ends the process as without one
    const idle = runChild(succession({ standbyAfterMs: 0, countdownMs: 400, rearm: false }))
    expect([idle.status, idle.signal], idle.out).toEqual([4, null])
    expect(idle.out).toContain('standby got [{"will":1}]')
    expect(idle.out).toContain('watch: agent ended')
    expect(idle.out).not.toContain('main ran on')
  })

  it('settled (disarmed) or failed (fired): the standby reads an empty end, no will', () => {
    const r = runChild(`
      const { Worker } = require('node:worker_threads')
      const b = ${load}
      const fs = require('node:fs'), net = require('node:net')
      const id = b.exitWatchCreate()
      const read = (fd) => new Promise((res) => { const s = new net.Socket({ fd, readable: true, writable: false }); let t = ''; s.on('data', (c) => (t += c)); s.on('end', () => { s.destroy(); res(t) }) })
      ;(async () => {
        b.exitWatchArm(id, 4, 10000, 'x', 'W')
        const settled = read(b.exitWatchSucceed(id))
        b.exitWatchDisarm(id)
        console.log('settled [' + (await settled) + ']')
        b.exitWatchArm(id, 4, 10000, 'x', 'W')
        const failed = read(b.exitWatchSucceed(id))
        b.exitWatchFire(id, 4, 10000, 'x')
        console.log('failed [' + (await failed) + ']')
        b.exitWatchTake(id)
      })()
    `)
    expect([r.status, r.signal], r.out).toEqual([0, null])
    expect(r.out.trim().split('\n')).toEqual(['settled []', 'failed []'])
  })

  it('a failure fired while armed ends the process unless taken; fired while idle it does nothing', () => {
    const fired = runChild(child(`b.exitWatchFire(id, 7, 100, 'watch: failure not taken\\\\n')`, { blockMs: 20_000 }))
    expect([fired.status, fired.signal]).toEqual([7, null])
    expect(fired.out).toContain('watch: failure not taken')
    const idle = runChild(`
      const b = ${load}
      const id = b.exitWatchCreate()
      console.log(b.exitWatchFire(id, 7, 10, 'x'), b.exitWatchArm(id, 4, 10, 'y'), b.exitWatchArm(id, 4, 10, 'y'))
      b.exitWatchTake(id)
      console.log(b.exitWatchFire(id, 7, 10, 'x'))
      for (const bad of [() => b.exitWatchArm(id + 1000, 4, 10, 'y'), () => b.exitWatchArm(id, 4, 10, 5), () => b.exitWatchFire(-1, 4, 10, 'y')]) {
        try { bad() } catch (e) { console.log(e.name + ': ' + e.message) }
      }
    `)
    expect([idle.status, idle.signal]).toEqual([0, null])
    expect(idle.out.trim().split('\n')).toEqual([
      'false true true', // not armed: nothing to fire; armed again (the same agent adds its will)
      'false', // taken: the service's thread has it
      expect.stringMatching(/^RangeError: no exit watch \d+$/),
      'TypeError: expected line to be a string',
      'RangeError: expected id to be an integer in [0, 4294967295], got -1',
    ])
  })
})
