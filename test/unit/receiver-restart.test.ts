/**
 * A receiver's agent that crashes before the hand-off (src/receive.ts receiveHandoff): a new one listens again over
 * emptied regions, up to MAX_RECEIVER_AGENTS; not one that crashed before it listened. Fake workers (the policy only).
 */
import { EventEmitter } from 'node:events'
import type { Worker } from 'node:worker_threads'
import { describe, expect, it } from 'vitest'
import { handoffState, MAX_RECEIVER_AGENTS, receiveHandoff, type Receiving } from '../../src/receive'

class FakeWorker extends EventEmitter {
  threadId = 1
  posted: unknown[] = []
  postMessage(m: unknown): void {
    this.posted.push(m)
  }
  terminate(): Promise<number> {
    return Promise.resolve(0)
  }
  /** The worker's thread ends after its crash: 'error', then (later) 'exit'. */
  crash(): void {
    this.emit('error', new Error('bug'))
    setImmediate(() => ((this.threadId = -1), this.emit('exit', 1)))
  }
}

const tick = () => new Promise((r) => setImmediate(r))

function receiver() {
  const workers: FakeWorker[] = [], log: string[] = []
  const receiving: Receiving = { refusals: {}, phase: 'listening', from: undefined }
  const spawn = (again: boolean) => {
    const w = new FakeWorker()
    log.push(`spawn again=${again}`)
    workers.push(w)
    return w as unknown as Worker
  }
  const empty = () => log.push(`empty (last worker gone: ${workers.at(-1)!.threadId === -1})`)
  return { workers, log, receiving, run: receiveHandoff(spawn, empty, receiving, 'g', '127.0.0.1:7000') }
}

describe('a receiver whose agent crashes before the hand-off', () => {
  it('empties the regions once the crashed worker is gone, starts another that listens, and takes its hand-off', async () => {
    const r = receiver()
    r.workers[0].emit('message', { type: 'listening', port: 7000, atMs: 0 })
    r.workers[0].emit('message', { type: 'incoming', peer: 'p' })
    expect(r.receiving.phase).toBe('precopy')
    r.workers[0].crash()
    await tick()
    await tick()
    expect(r.log).toEqual(['spawn again=false', 'empty (last worker gone: true)', 'spawn again=true'])
    expect(r.receiving.phase).toBe('listening') // status: waiting again
    r.workers[1].emit('message', { type: 'listening', port: 7000, atMs: 0 })
    r.workers[1].emit('message', { type: 'restore', state: handoffState.encode({ n: 1 }) })
    const got = await r.run
    expect(got.state).toEqual({ n: 1 })
    expect(got.worker).toBe(r.workers[1])
  })

  it(`gives up after ${MAX_RECEIVER_AGENTS} agents, and at once when one crashed before it listened`, async () => {
    const r = receiver()
    const ended = r.run.catch((e: unknown) => e)
    for (let i = 0; i < MAX_RECEIVER_AGENTS; i++) {
      await tick()
      r.workers[i].emit('message', { type: 'listening', port: 7000, atMs: 0 })
      r.workers[i].crash()
      await tick()
    }
    expect(await ended).toMatchObject({ code: 'ERR_AGENT', message: expect.stringMatching(/crashed before the hand-off/) })
    expect(r.workers).toHaveLength(MAX_RECEIVER_AGENTS)
    const early = receiver()
    early.workers[0].crash() // before 'listening': a bug at start, not tried again
    await expect(early.run).rejects.toMatchObject({ code: 'ERR_AGENT' })
    expect(early.workers).toHaveLength(1)
  })
})
