/**
 * The addon when its environment goes away: a worker terminated while it
 * calls into the addon (guest.close() during a batch of native events), and
 * constructors that throw. Each case runs in a child process of its own,
 * because the failure it guards against is an abort of the whole process.
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
