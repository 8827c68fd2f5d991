/**
 * The link's code, run once when the agent starts, against itself on
 * loopback: a dial, both sides of the handshake (HMAC, msgpack control
 * frames, the channel's framing). A migration's first connection otherwise
 * pays V8's first compile of all of it: the first handshake of a migration
 * took 10–13 ms against ~2 ms for the next one, and a whole 1 GiB hybrid
 * migration of a 90 %-free guest 182 ms against 156 ms with this (8
 * alternating pairs, medians). The agent is idle at start, so the cost moves
 * out of every migration's setup.
 * Never fails: a host where it cannot listen on loopback just starts cold.
 */
import { randomBytes } from 'node:crypto'
import { createServer, type Server } from 'node:net'
import { Channel } from '../protocol/channel'
import { clientHandshake, serverHandshake } from '../protocol/handshake'
import { decodeControl, encodeControl, Msg } from '../protocol/messages'
import { dialTcp } from './source/link'

export async function warmLinkCode(timeoutMs = 2000): Promise<boolean> {
  const token = randomBytes(32)
  let server: Server | undefined
  const channels: Channel[] = []
  const work = (async () => {
    server = createServer()
    await new Promise<void>((resolve, reject) => {
      server!.once('error', reject)
      server!.listen(0, '127.0.0.1', resolve)
    })
    // the first connection is ours (another local process that got in first just makes this fail); later ones close
    let taken = false
    const accepted = new Promise<Channel>((resolve) => server!.on('connection', (s) => (taken ? s.destroy() : ((taken = true), resolve(new Channel(s, 'incoming'))))))
    const client = new Channel(await dialTcp('127.0.0.1', (server.address() as { port: number }).port, timeoutMs), 'urgent')
    const incoming = await accepted
    channels.push(client, incoming)
    await Promise.all([serverHandshake(incoming, token), clientHandshake(client, token, { role: 'urgent', session: 'warm-up' })])
    // a control frame each way, as the clock exchange sends them
    client.send(encodeControl(Msg.CLOCK, { t0: 1 }))
    const f = await incoming.nextFrame()
    decodeControl(f.type, f.payload)
    return true
  })()
  work.catch(() => {}) // after a timeout nobody awaits it
  let timer: NodeJS.Timeout | undefined
  const timeout = new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(false), timeoutMs)))
  try {
    return await Promise.race([work, timeout]).catch(() => false)
  } finally {
    clearTimeout(timer)
    for (const ch of channels) ch.close()
    server?.close()
  }
}
