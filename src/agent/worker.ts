/**
 * Entry point of the agent's worker thread. It owns the uffd, the tracker and
 * the sockets; the service's main thread talks to it with messages only, so
 * the agent keeps running while the main thread is blocked in a fault.
 */
import { parentPort, workerData } from 'node:worker_threads'
import { loadBinding } from '../binding'
import { PageBitmap } from '../bitmap'
import type { UffdMigrateError } from '../errors'
import { Region, type RegionDescriptor } from '../region'
import { nowMs } from '../stats'
import { MigrationDestination } from './destination'
import { MigrationSource, type SourceOptions } from './source'
import type { AgentToMain, MainToAgent } from './messages'

export interface AgentWorkerData {
  role: 'source' | 'destination'
  regions: RegionDescriptor[]
  /** destination: shared received bitmaps, one per region */
  received?: SharedArrayBuffer[]
  listen?: string
  token?: string
  /** nice value of the agent's threads (0: as the service) */
  agentNice: number
}

const port = parentPort!
const data = workerData as AgentWorkerData
const binding = loadBinding()
const regions = data.regions.map((d) => Region.open(d, binding))
// This thread only: it pushes, installs and reads faults (on its own loop).
if (data.agentNice) binding.setThreadNice(data.agentNice)
const post = (m: AgentToMain) => port.postMessage(m)
const errorOut = (err: unknown) => ({
  message: (err as Error).message,
  code: (err as UffdMigrateError).code ?? 'ERR_UFFD_MIGRATE',
})

if (data.role === 'source') runSource()
else runDestination()

function runSource(): void {
  let pauseWaiter: { resolve: (s: Uint8Array) => void; reject: (e: Error) => void } | undefined
  let freed: number[] = []
  let running = false
  port.on('message', (m: MainToAgent) => {
    switch (m.type) {
      case 'migrate': {
        if (running) {
          post({ type: 'failed', error: { code: 'ERR_MIGRATION_BUSY', message: 'a migration is already running for this guest' } })
          return
        }
        running = true
        const opts: SourceOptions = { ...m.options, token: Buffer.from(m.options.token, 'utf8') }
        const source = new MigrationSource(binding, regions, opts, {
          pause: () => new Promise((resolve, reject) => {
            pauseWaiter = { resolve, reject }
            post({ type: 'pause' })
          }),
          resume: () => post({ type: 'resume' }),
          progress: (p) => post({ type: 'progress', progress: p }),
          takeFreed: () => {
            const out = freed
            freed = []
            return out
          },
        })
        source.run().then(
          (report) => post({ type: 'report', report }),
          (err) => {
            running = false
            post({ type: 'failed', error: errorOut(err) })
          },
        )
        return
      }
      case 'paused':
        pauseWaiter?.resolve(m.state)
        pauseWaiter = undefined
        return
      case 'pauseFailed': {
        const err = Object.assign(new Error(m.error.message), { code: m.error.code })
        pauseWaiter?.reject(err)
        pauseWaiter = undefined
        return
      }
      case 'free':
        // Only a running migration needs them: between migrations the
        // present-page scan of round 0 sees freed pages as zero anyway.
        if (running) freed.push(m.region, m.firstPage, m.pageCount)
        return
      case 'close':
        process.exit(0)
    }
  })
}

function runDestination(): void {
  const received = data.received!.map((sab, i) => new PageBitmap(regions[i].pageCount, sab))
  let resumeWaiter: ((t: number) => void) | undefined
  const dest = new MigrationDestination(binding, regions, received, Buffer.from(data.token!, 'utf8'), {
    restore: (state) => new Promise((resolve) => {
      resumeWaiter = resolve
      post({ type: 'restore', state })
    }),
    settled: () => post({ type: 'settled' }),
    ready: (ids) => post({ type: 'ready', ids }),
    failed: (err) => post({ type: 'failed', error: errorOut(err) }),
    recovering: (message) => post({ type: 'recovering', message }),
  })
  port.on('message', (m: MainToAgent) => {
    switch (m.type) {
      case 'resumed':
        resumeWaiter?.(m.atMs)
        resumeWaiter = undefined
        return
      case 'request':
        dest.request(m.region, m.firstPage, m.pageCount, m.urgent)
        return
      case 'wait':
        dest.waitFor(m.id, m.region, m.firstPage, m.pageCount)
        return
      case 'free':
        dest.free(m.region, m.firstPage, m.pageCount)
        return
      case 'close':
        dest.close()
        process.exit(0)
    }
  })
  dest.listen(data.listen!).then(
    (p) => post({ type: 'listening', port: p, atMs: nowMs() }),
    (err) => post({ type: 'failed', error: errorOut(err) }),
  )
}
