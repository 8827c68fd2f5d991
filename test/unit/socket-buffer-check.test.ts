/** The doctor's socket-buffer line: which hosts give pre-copy's bulk buffers, and what the others are told. */
import { describe, expect, it } from 'vitest'
import { socketBufferCheck } from '../../src/doctor'

describe("doctor: pre-copy's bulk socket buffers", () => {
  it('are available with CAP_NET_ADMIN whatever the caps, or with caps of 4 MiB and more', () => {
    expect(socketBufferCheck({ rmemMax: 212992, wmemMax: 212992, netAdmin: true })).toMatchObject({ available: true, detail: expect.stringMatching(/CAP_NET_ADMIN/) })
    expect(socketBufferCheck({ rmemMax: 4 << 20, wmemMax: 8 << 20, netAdmin: false })).toMatchObject({ available: true, detail: expect.stringMatching(/rmem_max=4194304, wmem_max=8388608/) })
  })

  it("a stock host (212992-byte caps) without CAP_NET_ADMIN: autotuning instead, and the sysctl that gives the measured setting", () => {
    const c = socketBufferCheck({ rmemMax: 212992, wmemMax: 4 << 20, netAdmin: false })
    expect(c.available).toBe(false)
    expect(c.detail).toMatch(/rmem_max=212992 .* autotuning .* sysctl -w net.core.rmem_max=4194304 net.core.wmem_max=4194304/)
  })
})
