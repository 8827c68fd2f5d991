// The test relay's frame cues inside an encrypted migration's sealed records (src/testing/relay.ts), with the hosts'
// key log ($UFFD_MIGRATE_KEYLOG, src/protocol/keylog.ts): the link breaks at a record's edge, before the record where
// the cued frame begins (it never arrives) or after the one where it ends. What the destination's side receives is
// opened with the record layer and its frames counted. No kernel feature: plain loopback TCP.
import { once } from 'node:events'
import { mkdtempSync, readFileSync, statSync } from 'node:fs'
import { connect, createServer, type Socket } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { randomBytes } from 'node:crypto'
import { describe, expect, it, vi } from 'vitest'
import { findKeys, logKeys } from '../src/protocol/keylog'
import { FrameDecoder } from '../src/protocol/frames'
import { encodeControl, Msg } from '../src/protocol/messages'
import { Opener, Sealer } from '../src/protocol/records'
import { Relay } from '../src/testing/relay'
import { pollUntil } from './helpers/wait'

/** A source that says HELLO in plaintext and then seals; the frames reaching the far side, opened. */
async function sealedThroughRelay(cue: { type: number; lose: boolean }) {
  const keylog = join(mkdtempSync(join(tmpdir(), 'relay-keys-')), 'keylog')
  const keys = { toServer: { key: randomBytes(32), iv: randomBytes(12) }, toClient: { key: randomBytes(32), iv: randomBytes(12) } }
  const nonce = randomBytes(32)
  logKeys(nonce, keys, { UFFD_MIGRATE_KEYLOG: keylog })
  const listener = createServer()
  listener.listen(0, '127.0.0.1')
  await once(listener, 'listening')
  const got: number[] = []
  let ended = false
  listener.on('connection', (s: Socket) => {
    let hello = true
    const frames = new FrameDecoder(() => (hello ? (hello = false) : undefined), 64 << 20)
    const inside = new FrameDecoder((f) => got.push(f.type), 64 << 20)
    const opener = new Opener(keys.toServer, (p) => inside.feed(p), 'test')
    // the first frame is HELLO (plaintext), the rest records
    let plain = true
    s.on('data', (c: Buffer) => {
      if (plain) {
        const len = c.readUInt32BE(0) + 4
        frames.feed(c.subarray(0, len))
        c = c.subarray(len)
        plain = false
      }
      if (c.length) opener.feed(c)
    })
    s.on('error', () => {})
    s.on('close', () => (ended = true))
  })
  const relay = new Relay(Infinity)
  relay.keylog = keylog
  relay.onFrame = { ...cue, toDestination: true }
  const [host, port] = (await relay.start('127.0.0.1', (listener.address() as { port: number }).port)).split(':')
  const source = connect(Number(port), host)
  source.on('error', () => {})
  await once(source, 'connect')
  const sealer = new Sealer(keys.toServer)
  source.write(Buffer.concat(encodeControl(Msg.HELLO, { nonce })))
  // three records: [ROUND_END, SYNC], [HANDOFF (300 KiB: two records' worth, one write here)], [SETTLED]
  const rec = (frames: Buffer[][]) => Buffer.concat(sealer.seal(frames.flat()))
  source.write(Buffer.concat([
    rec([encodeControl(Msg.ROUND_END, { round: 0 }), encodeControl(Msg.SYNC, {})]),
    rec([encodeControl(Msg.HANDOFF, { pad: Buffer.alloc(300 << 10, 1) })]),
    rec([encodeControl(Msg.SETTLED, {})]),
  ]))
  await pollUntil(() => relay.cuts > 0 && ended, 5000)
  relay.close()
  listener.close()
  source.destroy()
  return { got, keylog, nonce, keys }
}

describe('the test relay inside sealed records (a key log)', () => {
  it('lost: the break comes before the record where the cued frame begins; nothing of it arrives', async () => {
    const { got } = await sealedThroughRelay({ type: Msg.HANDOFF, lose: true })
    expect(got).toEqual([Msg.ROUND_END, Msg.SYNC])
  })

  it('delivered: the break comes after the record where the cued frame ends; nothing after it arrives', async () => {
    const { got } = await sealedThroughRelay({ type: Msg.HANDOFF, lose: false })
    expect(got).toEqual([Msg.ROUND_END, Msg.SYNC, Msg.HANDOFF])
  })

  it('a cue on frames coming back from the destination: the source HELLO names the keys, the other way is opened', async () => {
    const keylog = join(mkdtempSync(join(tmpdir(), 'relay-keys-')), 'keylog')
    const keys = { toServer: { key: randomBytes(32), iv: randomBytes(12) }, toClient: { key: randomBytes(32), iv: randomBytes(12) } }
    const nonce = randomBytes(32)
    logKeys(nonce, keys, { UFFD_MIGRATE_KEYLOG: keylog })
    const listener = createServer((s: Socket) => {
      s.on('error', () => {})
      s.once('data', () => {
        // the destination's HELLO in plaintext, then sealed: ROUND_END, then SETTLED (cued, lost), then SERVICE
        const sealer = new Sealer(keys.toClient)
        s.write(Buffer.concat([
          ...encodeControl(Msg.HELLO, { nonce: randomBytes(32) }),
          ...sealer.seal(encodeControl(Msg.ROUND_END, { round: 1 })),
          ...sealer.seal(encodeControl(Msg.SETTLED, {})),
          ...sealer.seal(encodeControl(Msg.SERVICE, { ports: [] })),
        ]))
      })
    })
    listener.listen(0, '127.0.0.1')
    await once(listener, 'listening')
    const relay = new Relay(Infinity, false, Msg.SETTLED) // back from the destination, lost
    relay.keylog = keylog
    const [host, port] = (await relay.start('127.0.0.1', (listener.address() as { port: number }).port)).split(':')
    const source = connect(Number(port), host)
    source.on('error', () => {})
    await once(source, 'connect')
    const got: number[] = []
    const inside = new FrameDecoder((f) => got.push(f.type), 64 << 20)
    const opener = new Opener(keys.toClient, (p) => inside.feed(p), 'test')
    let plain = true
    let ended = false
    source.on('data', (c: Buffer) => {
      if (plain) (c = c.subarray(c.readUInt32BE(0) + 4)), (plain = false)
      if (c.length) opener.feed(c)
    })
    source.on('close', () => (ended = true))
    source.write(Buffer.concat(encodeControl(Msg.HELLO, { nonce })))
    await pollUntil(() => relay.cuts > 0 && ended, 5000)
    expect(got).toEqual([Msg.ROUND_END])
    relay.close()
    listener.close()
  })

  it('a key log that cannot be written fails no migration: the handshake goes on', () => {
    const keys = { toServer: { key: randomBytes(32), iv: randomBytes(12) }, toClient: { key: randomBytes(32), iv: randomBytes(12) } }
    const said: string[] = []
    const spy = vi.spyOn(process.stderr, 'write').mockImplementation((chunk) => (said.push(String(chunk)), true))
    try {
      logKeys(randomBytes(32), keys, { UFFD_MIGRATE_KEYLOG: join(tmpdir(), 'no-such-dir-uffdm', 'keylog') })
    } finally {
      spy.mockRestore()
    }
    expect(said.join('')).toMatch(/cannot write the key log \S+no-such-dir-uffdm\/keylog: ENOENT.*; migrations go on without it/)
  })

  it('the key log: one owner-only line per connection, found by the source HELLO nonce', async () => {
    const { keylog, nonce, keys } = await sealedThroughRelay({ type: Msg.SETTLED, lose: true })
    expect(statSync(keylog).mode & 0o777).toBe(0o600)
    const found = findKeys(readFileSync(keylog, 'utf8'), nonce)
    expect(found?.toServer.key.equals(keys.toServer.key)).toBe(true)
    expect(found?.toClient.iv.equals(keys.toClient.iv)).toBe(true)
    expect(findKeys(readFileSync(keylog, 'utf8'), randomBytes(32))).toBeUndefined()
  })
})
