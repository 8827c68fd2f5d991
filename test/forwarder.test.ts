/**
 * The forwarder on its own, with real HTTP servers on loopback (no addon):
 * held requests reach the service again when the migration did not happen,
 * or the destination's service when it did; new connections are relayed.
 */
import { createServer, get, type Server } from 'node:http'
import { afterEach, describe, expect, it } from 'vitest'
import { Forwarder } from '../src/forwarder'

const servers: Server[] = []
afterEach(() => {
  for (const s of servers.splice(0)) s.close()
})

async function listen(name: string): Promise<{ server: Server; port: number; seen: string[] }> {
  const seen: string[] = []
  const server = createServer((req, res) => {
    seen.push(req.url!)
    res.end(`${name}:${req.url}`)
  })
  servers.push(server)
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r))
  return { server, port: Forwarder.port(server)!, seen }
}

function fetch(port: number, path: string): Promise<{ body: string; connection?: string }> {
  return new Promise((resolve, reject) => {
    get({ host: '127.0.0.1', port, path, agent: false }, (res) => {
      let body = ''
      res.on('data', (c) => (body += c))
      res.on('end', () => resolve({ body, connection: res.headers.connection }))
    }).on('error', reject)
  })
}

const turn = () => new Promise((r) => setTimeout(r, 50))

describe('forwarder', () => {
  it('holds requests while paused and gives them back to the service when the migration did not happen', async () => {
    const src = await listen('src')
    const f = new Forwarder()
    f.serve(src.server)
    f.hold()
    let done = false
    const pending = fetch(src.port, '/held').then((r) => ((done = true), r))
    await turn()
    expect(done).toBe(false) // waiting, not refused
    expect(src.seen).toEqual([])
    f.release()
    expect((await pending).body).toBe('src:/held')
    expect((await fetch(src.port, '/after')).body).toBe('src:/after')
  })

  it('prepare() runs the proxy path once against a server of its own: the service sees nothing and nothing is left open', async () => {
    const src = await listen('src')
    const f = new Forwarder()
    await f.prepare() // not serving: nothing to do
    f.serve(src.server)
    const servers = () => process.getActiveResourcesInfo().filter((r) => r === 'TCPServerWrap').length
    const before = servers()
    await f.prepare()
    expect(servers()).toBe(before)
    expect(src.seen).toEqual([])
    expect(f.counts).toEqual({ connections: 0, requests: 0, bytes: 0, spliced: 0 })
    expect((await fetch(src.port, '/after')).body).toBe('src:/after')
  })

  it('after the hand-off: held requests are proxied (connection: close), new connections relayed, then idle', async () => {
    const src = await listen('src'), dst = await listen('dst')
    const f = new Forwarder()
    expect(f.serving).toBe(false)
    f.serve(src.server)
    expect(f.serve(src.server)).toBe(0) // once
    f.hold()
    const held = fetch(src.port, '/held')
    await turn()
    f.forwardTo([{ host: '127.0.0.1', port: dst.port }])
    const r = await held
    expect(r.body).toBe('dst:/held')
    expect(r.connection).toBe('close')
    expect((await fetch(src.port, '/new')).body).toBe('dst:/new')
    expect(src.seen).toEqual([])
    expect(dst.seen).toEqual(['/held', '/new'])
    expect(f.counts.requests).toBe(1)
    expect(f.counts.connections).toBe(1)
    await turn()
    expect(f.idleFor(10)).toBe(true)
    expect(f.idleFor(60_000)).toBe(false)
  })

  it('a destination that is gone answers 502, never hangs', async () => {
    const src = await listen('src')
    const f = new Forwarder()
    f.serve(src.server)
    f.hold()
    const held = new Promise<number>((resolve, reject) => {
      get({ host: '127.0.0.1', port: src.port, path: '/x', agent: false }, (res) => {
        res.resume()
        resolve(res.statusCode!)
      }).on('error', reject)
    })
    await turn()
    f.forwardTo([{ host: '127.0.0.1', port: 1 }])
    expect(await held).toBe(502)
  })

  it('refuses what is not a server', () => {
    expect(() => new Forwarder().serve({} as never)).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG' }))
  })
})
