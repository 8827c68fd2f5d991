import { describe, expect, it } from 'vitest'
import { WaitBatch } from '../../src/wait-batch'

describe('WaitBatch', () => {
  it('sends the waits of one turn in one message, in order, each with its own id; a later turn sends its own', async () => {
    const sent: number[][] = []
    const b = new WaitBatch((w) => sent.push(w))
    const ids = [b.add(0, 10, 1), b.add(1, 20, 2), b.add(0, 30, 3)]
    expect(sent).toEqual([]) // not before the current code yields
    await Promise.resolve()
    expect(sent).toEqual([[ids[0], 0, 10, 1, ids[1], 1, 20, 2, ids[2], 0, 30, 3]])
    expect(new Set(ids).size).toBe(3)
    const later = b.add(2, 40, 4)
    await Promise.resolve()
    expect(sent).toEqual([[ids[0], 0, 10, 1, ids[1], 1, 20, 2, ids[2], 0, 30, 3], [later, 2, 40, 4]])
    expect(later).toBeGreaterThan(ids[2])
  })
})

describe('WaitBatch: the open waits', () => {
  it('settle when the agent answers them, all at once when settled or failed, and go again in one message to an agent that took over', async () => {
    const sent: number[][] = []
    const b = new WaitBatch((w) => sent.push(w))
    const done: string[] = []
    const track = (name: string, p: Promise<void>) => p.then(() => done.push(`${name} ok`), (e: Error) => done.push(`${name} ${e.message}`))
    const w1 = track('w1', b.wait(0, 10, 1)), w2 = track('w2', b.wait(1, 20, 2)), w3 = track('w3', b.wait(0, 30, 3))
    await Promise.resolve()
    const [[id1, , , , id2, , , , id3]] = sent
    b.ready([id2])
    await w2
    expect(done).toEqual(['w2 ok'])
    b.resend() // (a standby took over: w1 and w3 are still open, with their ids)
    expect(sent[1]).toEqual([id1, 0, 10, 1, id3, 0, 30, 3])
    b.endAll(new Error('failed'))
    await Promise.all([w1, w3])
    expect(done).toEqual(['w2 ok', 'w1 failed', 'w3 failed'])
    b.resend() // nothing open: no message
    expect(sent).toHaveLength(2)
    const w4 = track('w4', b.wait(2, 40, 4))
    b.endAll()
    await w4
    expect(done.at(-1)).toBe('w4 ok')
  })
})
