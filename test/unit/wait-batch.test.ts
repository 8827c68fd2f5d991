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
