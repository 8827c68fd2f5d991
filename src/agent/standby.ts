/**
 * A standby destination agent (src/agent-handle.ts, src/agent/destination/takeover.ts): it waits for the will the
 * exit watch writes when the agent ends, then becomes the agent (agent-main.ts, loaded only then). An empty end: the
 * migration settled or failed, nothing to take over, and this worker ends with it. Messages from the service's
 * thread wait in the port until then.
 */
import { Socket } from 'node:net'
import { workerData } from 'node:worker_threads'
import { loadBinding } from '../binding'
import { logLine } from '../log'
import { parseWill } from './destination/takeover'
import type { AgentWorkerData } from './worker-data'

const data = workerData as AgentWorkerData
// a bug while it waits: it says so (the service's thread ignores a standby's end; agent-main.ts has its own once loaded)
const crashed = (err: Error) => logLine(data.name ?? '?', 'agent-crashed', `the standby agent crashed: ${err?.stack ?? String(err)}`, 'error')
process.on('uncaughtExceptionMonitor', crashed)
const binding = loadBinding()
// started early: not before the service's thread says so (a will left meanwhile waits in the watch for this one)
const go = data.standbyGo ? new Int32Array(data.standbyGo) : undefined
const waited = go && (Atomics as unknown as { waitAsync(a: Int32Array, i: number, v: number): { async: boolean; value: Promise<string> } }).waitAsync(go, 0, 0)
if (waited && waited.async) {
  const alive = setInterval(() => {}, 2 ** 30) // (a pending waitAsync alone does not keep this thread's loop running)
  void waited.value.then(() => (clearInterval(alive), waitForWill()))
} else waitForWill()

function waitForWill(): void {
  binding.exitWatchBind?.(data.exitWatch!) // before the uffd and threads it makes on taking over (see exit_watch.cc)
  const sock = new Socket({ fd: binding.exitWatchSucceed!(data.exitWatch!), readable: true, writable: false })
  let text = ''
  sock.setEncoding('utf8')
  sock.on('data', (c: string) => (text += c))
  sock.on('end', () => {
    sock.destroy()
    if (!text.trim()) return
    try {
      data.will = parseWill(text.trim())
    } catch (err) {
      // a bug: say so (nobody else would; the exit watch's countdown, which the crash started, runs on)
      return logLine(data.name ?? '?', 'agent-crashed', `the standby agent could not take over: ${(err as Error).message}`, 'error')
    }
    process.off('uncaughtExceptionMonitor', crashed)
    require('./agent-main')
  })
}
