/**
 * A destination that cannot place pages (UFFDIO_COPY failing: ENOMEM when
 * its memory cgroup is full) stops the migration loudly instead of leaving a
 * service thread blocked for ever on a page that never comes: the source
 * hears why, with a stable code, before and after the hand-off. The failure
 * is injected by the addon (UFFD_MIGRATE_FAULT_INJECT=install:N: the Nth
 * install of this process and every later one fail with ENOMEM, after the
 * ~200 ms of retries a real ENOMEM gets); it is read once per process, so it
 * is set before anything here installs a page.
 */
process.env.UFFD_MIGRATE_FAULT_INJECT = 'install:3'

import { afterAll, describe, expect, it } from 'vitest'
import { Guest } from '../src/guest'
import { freePort } from '../src/cli/proc'
import { kernelSkipReason } from './helpers/gate'

const skip = kernelSkipReason()
const TOKEN = 'install-failure-token-0123456789'
const MiB = 1 << 20

describe.skipIf(skip)('a destination that cannot place pages', () => {
  const guests: Guest[] = []
  afterAll(async () => {
    for (const g of guests) await g.close().catch(() => {})
  })

  async function pair(name: string) {
    const port = await freePort()
    const destP = Guest.start({ name: `${name}-dst-${port}`, regions: { store: 8 * MiB }, receive: `127.0.0.1:${port}`, token: TOKEN, control: false })
    destP.catch(() => {})
    const src = await Guest.start({ name: `${name}-src-${port}`, regions: { store: 8 * MiB }, token: TOKEN, control: false, exitOnMoved: false })
    guests.push(src)
    const u8 = new Uint8Array(src.regions.store.buffer)
    // no page all zero: the destination installs nothing before the hand-off in post-copy (zero pages would go
    // in as the zero page then, and the injected failure would end the migration before it)
    for (let p = 0; p < u8.length; p += 4096) u8.fill(((p / 4096) % 255) + 1, p, p + 64)
    const expected = u8.slice()
    return { port, src, destP, unharmed: () => Buffer.compare(Buffer.from(u8), Buffer.from(expected)) === 0 }
  }

  it('before the hand-off: the migration fails with the destination\'s reason, and the service runs on at the source', async () => {
    const { port, src, unharmed } = await pair('pre')
    const err = await src.migrate({ to: `127.0.0.1:${port}`, mode: 'precopy' }).then(() => undefined, (e) => e)
    expect(err).toMatchObject({ code: 'ERR_MIGRATION_ABORTED' })
    expect(err.message).toMatch(/could not place \d+ page\(s\) of region 0 from page \d+: ENOMEM: the destination is out of memory/)
    expect(src.phase).toBe('idle') // not moved: the service runs here
    expect(src.lastError).toMatchObject({ code: 'ERR_MIGRATION_ABORTED' })
    expect(unharmed()).toBe(true)
  })

  it('after the hand-off: the source hears why and fails (it keeps its memory) instead of waiting for a destination that cannot go on', async () => {
    const { port, src, destP, unharmed } = await pair('post')
    const failedAtDest = destP.then((dest) => {
      guests.push(dest)
      return new Promise<Error>((resolve) => dest.once('failed', resolve))
    })
    const err = await src.migrate({ to: `127.0.0.1:${port}`, mode: 'postcopy' }).then(() => undefined, (e) => e)
    expect(err).toMatchObject({ code: 'ERR_MIGRATION_ABORTED' })
    expect(err.message).toMatch(/could not place .* ENOMEM/)
    expect(src.phase).toBe('failed') // after its hand-off (checked first: before it, the destination never fails)
    expect(await failedAtDest).toMatchObject({ code: 'ERR_MIGRATION_ABORTED' })
    expect(unharmed()).toBe(true)
    // a once('failed') listener handles it: the destination's process is not ended (exit code 4 is set first)
    expect(process.exitCode).toBeUndefined()
  })
})
