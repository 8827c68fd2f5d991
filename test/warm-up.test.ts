/** The agent's warm-up of its link code: a real loopback handshake against itself, and nothing left open after it. */
import { describe, expect, it } from 'vitest'
import { warmLinkCode } from '../src/agent/warm-up'
import { pollUntil } from './helpers/wait'

const handles = () => process.getActiveResourcesInfo().filter((r) => r.startsWith('TCP') || r.endsWith('ShutdownWrap')).length

describe('warmLinkCode', () => {
  it('completes a handshake on loopback and leaves no server, socket or timer behind', async () => {
    const before = handles()
    expect(await warmLinkCode()).toBe(true)
    // the sockets end gracefully (FIN, then close): wait for that, up to 5 s
    await pollUntil(() => handles() === before, 5000, 50)
    expect(handles()).toBe(before)
  })

  it('gives up (false) instead of waiting past its timeout', async () => {
    expect(await warmLinkCode(0)).toBe(false)
  })
})
