/** The bulk socket's settings from the environment: defaults, values, and a clear error for a bad one. */
import { describe, expect, it } from 'vitest'
import { resolveSocketTuning } from '../../src/options'
import { DEFAULT_BULK_SOCKET_BUFFER_BYTES, DEFAULT_PUSH_UNSENT_BYTES } from '../../src/protocol/messages'

describe('resolveSocketTuning', () => {
  it('takes the defaults, byte counts, and 0 (the kernel\'s own) from the environment', () => {
    expect(resolveSocketTuning({})).toEqual({ bulkBufferBytes: DEFAULT_BULK_SOCKET_BUFFER_BYTES, pushUnsentBytes: DEFAULT_PUSH_UNSENT_BYTES })
    expect(resolveSocketTuning({ UFFD_MIGRATE_BULK_BUFFER_BYTES: '262144', UFFD_MIGRATE_PUSH_UNSENT_BYTES: '0' })).toEqual({ bulkBufferBytes: 262144, pushUnsentBytes: 0 })
  })

  it('refuses what is not a byte count with ERR_INVALID_ARG naming the variable', () => {
    for (const [name, raw] of [['UFFD_MIGRATE_PUSH_UNSENT_BYTES', '128k'], ['UFFD_MIGRATE_BULK_BUFFER_BYTES', '-1'], ['UFFD_MIGRATE_BULK_BUFFER_BYTES', '2147483648'], ['UFFD_MIGRATE_PUSH_UNSENT_BYTES', '1.5']]) {
      expect(() => resolveSocketTuning({ [name]: raw }), `${name}=${raw}`).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG', message: expect.stringContaining(`${name} to be a byte count`) }))
    }
  })
})
