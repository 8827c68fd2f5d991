/**
 * Failure paths: a wrong region table, protocol version or token, a
 * destination that is not there, a hostile source, a failing pause() hook.
 * Each ends the migration with a clear error and a stable code, and the
 * source guest keeps running unharmed (invariants 3 and 4).
 */
import { connect, createServer, type Socket } from 'node:net'
import { join } from 'node:path'
import { afterAll, describe, expect, it } from 'vitest'
import { Guest } from '../src/guest'
import { Channel } from '../src/protocol/channel'
import { clientHandshake, peerError } from '../src/protocol/handshake'
import { encodeControl, encodeRuns, Msg, pagesHeader, PROTOCOL_NAME, PROTOCOL_VERSION } from '../src/protocol/messages'
import { freePort, LineProc } from '../src/cli/proc'
import { kernelSkipReason } from './helpers/gate'

const skip = kernelSkipReason()
const TOKEN = 'failure-tests-token-0123456789'
const MiB = 1 << 20

function startSource(extra: Partial<Parameters<typeof Guest.start>[0]> = {}) {
  return Guest.start({ name: `src-${process.pid}`, regions: { store: 8 * MiB }, token: TOKEN, control: false, exitOnMoved: false, ...extra })
}

/** A source guest with known bytes, to check it is unharmed after a failure. */
async function sourceWithData() {
  const guest = await startSource()
  const u8 = new Uint8Array(guest.regions.store.buffer)
  for (let p = 0; p < u8.length; p += 4096) u8[p] = (p / 4096) & 0xff
  const unharmed = () => {
    for (let p = 0; p < u8.length; p += 4096) if (u8[p] !== ((p / 4096) & 0xff)) return false
    u8[4096] = 99 // still writable
    const ok = u8[4096] === 99
    u8[4096] = 1
    return ok
  }
  return { guest, unharmed }
}

/** Connects, retrying while the destination's agent is still starting to listen. */
async function dial(port: number): Promise<Socket> {
  for (let i = 0; ; i++) {
    try {
      return await new Promise((resolve, reject) => {
        const s = connect(port, '127.0.0.1', () => resolve(s))
        s.once('error', reject)
      })
    } catch (err) {
      if (i > 50) throw err
      await new Promise((r) => setTimeout(r, 50))
    }
  }
}

async function fakeSource(port: number, token: string, role: 'urgent' | 'bulk' = 'bulk') {
  const ch = new Channel(await dial(port), 'fake')
  await clientHandshake(ch, Buffer.from(token), { role, session: 'fake-session' })
  return ch
}

/** A real source migrates to the receiver at port, which must not have failed; every byte arrives. */
async function expectRealMigration(port: number, destP: Promise<Guest>, failed: Promise<unknown>) {
  const { guest, unharmed } = await sourceWithData()
  const expected = new Uint8Array(guest.regions.store.buffer).slice()
  const report = await guest.migrate({ to: `127.0.0.1:${port}`, mode: 'hybrid' })
  expect(report.pagesSentTwiceAfterHandoff).toBe(0)
  expect(unharmed).toBeTypeOf('function')
  const dest = await Promise.race([destP, failed.then((e) => { throw e })])
  await dest.settled
  expect(Buffer.compare(Buffer.from(new Uint8Array(dest.regions.store.buffer)), Buffer.from(expected))).toBe(0)
  await dest.close()
  await guest.close()
}

describe.skipIf(skip)('migration failures', () => {
  const guests: Guest[] = []
  afterAll(async () => {
    for (const g of guests) await g.close()
  })

  it('refuses a region table that differs, on both sides, and the source keeps running', async () => {
    const port = await freePort()
    const env = { ...process.env, UFFD_MIGRATE_TOKEN: TOKEN, XDG_RUNTIME_DIR: join(__dirname, '..', 'node_modules', '.cache') }
    const dest = new LineProc(process.execPath, [join(__dirname, '..', 'bin', 'uffd-migrate.js'), 'receive', '--listen', `127.0.0.1:${port}`, '--', process.execPath, join(__dirname, '..', 'examples', 'page-store', 'server.js'), '--mib', '4', '--name', 'mismatch'], { env })
    const { guest, unharmed } = await sourceWithData()
    guests.push(guest)
    const err = await guest.migrate({ to: `127.0.0.1:${port}` }).catch((e) => e)
    expect(err.code).toBe('ERR_MIGRATION_REGIONS')
    expect(err.message).toMatch(/the source has \{store=8388608\}.*destination asked for \{store=4194304\}/)
    expect(unharmed()).toBe(true)
    // only the hand-off commits: the receiver says why on one line and listens for the next source
    await dest.waitLine(/ended before the hand-off \(region table mismatch.*\[ERR_MIGRATION_REGIONS\]; listening for the next source/, 10_000, 'stderr')
    expect(dest.exitCode).toBeNull()
    dest.kill()
  })

  it('says clearly when no destination is listening', async () => {
    const { guest, unharmed } = await sourceWithData()
    guests.push(guest)
    const port = await freePort()
    const t0 = Date.now()
    const err = await guest.migrate({ to: `127.0.0.1:${port}`, connectTimeoutMs: 300 }).catch((e) => e)
    expect(err.code).toBe('ERR_MIGRATION_CONNECT')
    expect(err.message).toMatch(/ECONNREFUSED.*uffd-migrate receive --listen 127\.0\.0\.1:\d+/)
    expect(Date.now() - t0).toBeLessThan(3000)
    expect(unharmed()).toBe(true)
    // the guest can try again
    const again = await guest.migrate({ to: `127.0.0.1:${port}`, connectTimeoutMs: 100 }).catch((e) => e)
    expect(again.code).toBe('ERR_MIGRATION_CONNECT')
  })

  it('says clearly when the address accepts connections and never answers (a stopped receiver): within linkTimeoutMs, not never', async () => {
    const { guest, unharmed } = await sourceWithData()
    guests.push(guest)
    const held: Socket[] = []
    const silent = createServer((s) => void held.push(s)) // the kernel accepts; nobody answers
    await new Promise<void>((r) => silent.listen(0, '127.0.0.1', r))
    try {
      const to = `127.0.0.1:${(silent.address() as { port: number }).port}`
      const err = await guest.migrate({ to, linkTimeoutMs: 1000 }).catch((e) => e)
      expect(err.code).toBe('ERR_MIGRATION_CONNECT')
      expect(err.message).toMatch(/accepted the urgent connection but did not complete the handshake within 1000 ms \(linkTimeoutMs\): a stopped or overloaded receiver/)
      expect(unharmed()).toBe(true)
    } finally {
      for (const s of held) s.destroy()
      silent.close()
    }
  })

  it('refuses a peer that speaks another protocol version before anything moves', async () => {
    // a fake destination that answers HELLO with version 99
    const server = createServer((s) => {
      s.once('data', () => s.write(Buffer.concat(encodeControl(Msg.HELLO, { proto: PROTOCOL_NAME, version: 99, nonce: Buffer.alloc(32), proof: Buffer.alloc(32) }))))
    })
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r))
    const { guest, unharmed } = await sourceWithData()
    guests.push(guest)
    const err = await guest.migrate({ to: `127.0.0.1:${(server.address() as { port: number }).port}` }).catch((e) => e)
    server.close()
    expect(err.code).toBe('ERR_MIGRATION_VERSION')
    expect(err.message).toMatch(new RegExp(`version 99.*version ${PROTOCOL_VERSION}`))
    expect(unharmed()).toBe(true)
  })

  it('refuses a source without the token, and a destination without it, before any page moves', async () => {
    const port = await freePort()
    const destP = Guest.start({ name: `d-${port}`, regions: { store: 8 * MiB }, receive: `127.0.0.1:${port}`, token: 'the-other-token-abcdefghijkl', control: false })
    destP.catch(() => {})
    const { guest, unharmed } = await sourceWithData()
    guests.push(guest)
    const err = await guest.migrate({ to: `127.0.0.1:${port}` }).catch((e) => e)
    expect(err.code).toBe('ERR_MIGRATION_AUTH')
    expect(err.message).toMatch(/tokens differ/)
    expect(unharmed()).toBe(true)
    // the destination is still waiting for a proper source: a fake one with the wrong token is refused too
    const refused = await fakeSource(port, 'yet-another-token-xxxxxxxxx').catch((e) => e)
    expect(refused.code).toBe('ERR_MIGRATION_AUTH')
  })

  it('ends the migration on a hostile frame (page outside the region) without crashing or writing out of bounds', async () => {
    const port = await freePort()
    const destP = Guest.start({ name: `h-${port}`, regions: { store: 8 * MiB }, receive: `127.0.0.1:${port}`, token: TOKEN, control: false })
    const failed = destP.catch((e) => e)
    const urgent = await fakeSource(port, TOKEN, 'urgent')
    const bulk = await fakeSource(port, TOKEN)
    bulk.send(encodeControl(Msg.REGIONS, { pageSize: 4096, mode: 'hybrid', regions: [{ name: 'store', sizeBytes: 8 * MiB }] }))
    expect((await bulk.nextFrame()).type).toBe(Msg.REGIONS_OK)
    // page 2048 is one past the end of an 8 MiB region
    bulk.send([pagesHeader(0, 2048, 1, 4096), Buffer.alloc(4096, 0xee)])
    const answer = await bulk.nextFrame()
    expect(answer.type).toBe(Msg.ERROR)
    const err = peerError(answer.payload)
    expect(err.code).toBe('ERR_MIGRATION_PROTOCOL')
    expect(err.message).toMatch(/within \[0, 2048\) of region 0 in PAGES, got 2048\+1/)
    urgent.close()
    bulk.close()
    // the receiver is unharmed and still listening: a real source moves its service there
    await expectRealMigration(port, destP, failed)
  })

  it('ends the migration on a run list that reaches past a region', async () => {
    const port = await freePort()
    const destP = Guest.start({ name: `r-${port}`, regions: { store: 8 * MiB }, receive: `127.0.0.1:${port}`, token: TOKEN, control: false })
    const failed = destP.catch((e) => e)
    const bulk = await fakeSource(port, TOKEN)
    bulk.send(encodeControl(Msg.REGIONS, { pageSize: 4096, mode: 'hybrid', regions: [{ name: 'store', sizeBytes: 8 * MiB }] }))
    await bulk.nextFrame()
    bulk.send(encodeRuns(Msg.RANGES, 0, 0, [2000, 100]))
    const answer = await bulk.nextFrame()
    expect(peerError(answer.payload).code).toBe('ERR_MIGRATION_PROTOCOL')
    bulk.close()
    await expectRealMigration(port, destP, failed)
  })

  it('reports a pause() hook that throws, and lets the service run on here', async () => {
    let resumed = 0
    const port = await freePort()
    const destP = Guest.start({ name: `p-${port}`, regions: { store: 8 * MiB }, receive: `127.0.0.1:${port}`, token: TOKEN, control: false })
    destP.catch(() => {})
    const guest = await startSource({ name: `pause-${port}`, pause: () => { throw new Error('database busy') }, resume: () => resumed++ })
    guests.push(guest)
    const err = await guest.migrate({ to: `127.0.0.1:${port}`, mode: 'postcopy' }).catch((e) => e)
    expect(err.code).toBe('ERR_GUEST_PAUSE')
    expect(err.message).toMatch(/pause\(\) failed: database busy/)
    expect(resumed).toBe(1)
  })

  it('rejects bad migrate() options before connecting', async () => {
    const guest = await startSource({ name: `opts-${process.pid}` })
    guests.push(guest)
    await expect(guest.migrate({ to: 'nowhere' })).rejects.toMatchObject({ code: 'ERR_INVALID_ARG', message: expect.stringMatching(/host:7070/) })
    await expect(guest.migrate({ to: '127.0.0.1:1', mode: 'sideways' as never })).rejects.toMatchObject({ code: 'ERR_INVALID_ARG' })
    await expect(guest.migrate({ to: '127.0.0.1:1', maxRounds: 0 })).rejects.toMatchObject({ code: 'ERR_INVALID_ARG' })
    // checked before anything moves, not at the hand-off where the policy is built
    await expect(guest.migrate({ to: '127.0.0.1:1', prepaging: { strategy: 'bubbel' as never } })).rejects.toMatchObject({ code: 'ERR_INVALID_ARG', message: expect.stringMatching(/unknown prepaging strategy "bubbel": expected one of bubble, bubble1, push, demand/) })
    await expect(guest.migrate({ to: '127.0.0.1:1', prepaging: { pivots: 0 } })).rejects.toMatchObject({ code: 'ERR_INVALID_ARG', message: expect.stringMatching(/pivots/) })
    // guest.free() takes only this guest's regions, and ranges inside them
    expect(() => guest.free('nope', 0, 4096)).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG', message: expect.stringMatching(/region of this guest \('store'\), got "nope"/) }))
    const other = await startSource({ name: `opts2-${process.pid}` })
    guests.push(other)
    expect(() => guest.free(other.regions.store, 0, 4096)).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG' }))
    expect(() => guest.free('store', 0, 9 * MiB)).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG', message: expect.stringMatching(/inside region 'store'/) }))
  })
})
