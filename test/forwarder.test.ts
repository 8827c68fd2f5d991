/**
 * The forwarder on its own, with real HTTP servers on loopback (and the
 * addon's relay thread where built): held requests reach the service again
 * when the migration did not happen, or the destination's service when it
 * did; new connections are relayed.
 */
import { createServer, get, type Server } from 'node:http'
import { connect, type Socket } from 'node:net'
import { afterEach, describe, expect, it } from 'vitest'
import { loadBinding } from '../src/binding'
import { Forwarder } from '../src/forwarder'
import { rehearseForwarding } from '../src/forward-rehearsal'

const servers: Server[] = []
const nativeRelay = Boolean(loadBinding().Relay) && process.env.UFFD_MIGRATE_RELAY !== 'js'
afterEach(() => {
  for (const s of servers.splice(0)) s.close()
})

async function listen(name: string): Promise<{ server: Server; port: number; seen: string[] }> {
  const seen: string[] = []
  const server = createServer((req, res) => {
    let body = ''
    req.on('data', (c) => (body += c))
    req.on('end', () => {
      seen.push(body ? `${req.url} ${body}` : req.url!)
      res.end(`${name}:${req.url}`)
    })
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

/** A raw HTTP/1.1 client on one connection: send() writes bytes, next() resolves with the next whole answer (content-length bodies). */
function rawClient(port: number): { socket: Socket; send(text: string): void; next(): Promise<{ head: string; body: string }> } {
  const socket = connect({ host: '127.0.0.1', port })
  let buf = ''
  let waiter: (() => void) | undefined
  socket.setEncoding('latin1')
  socket.on('data', (c: string) => {
    buf += c
    waiter?.()
  })
  const parse = () => {
    const end = buf.indexOf('\r\n\r\n')
    if (end < 0) return undefined
    const head = buf.slice(0, end)
    const length = Number(/content-length: *(\d+)/i.exec(head)?.[1] ?? 0)
    if (buf.length < end + 4 + length) return undefined
    const body = buf.slice(end + 4, end + 4 + length)
    buf = buf.slice(end + 4 + length)
    return { head, body }
  }
  return {
    socket,
    send: (text) => socket.write(text),
    next: () =>
      new Promise((resolve, reject) => {
        socket.once('error', reject)
        const check = () => {
          const r = parse()
          if (r) {
            waiter = undefined
            resolve(r)
          } else waiter = check
        }
        check()
      }),
  }
}

const turn = () => new Promise((r) => setTimeout(r, 50))

/** A source and a destination service, the source's requests held; `text` sent raw on one connection while held, then the hand-off. */
async function heldThenForwarded(text: string) {
  const src = await listen('src'), dst = await listen('dst')
  const f = new Forwarder()
  f.serve(src.server)
  f.hold()
  const c = rawClient(src.port)
  c.send(text)
  await turn()
  f.forwardTo([{ host: '127.0.0.1', port: dst.port }])
  return { src, dst, f, c }
}

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

  it('prepare() is a no-op until a server is served, then says whether the HTTP path is to be rehearsed', async () => {
    const f = new Forwarder()
    expect(f.prepare()).toBe(false) // not serving: nothing to do
    const src = await listen('src')
    f.serve(src.server)
    expect(f.prepare()).toBe(true)
    expect(f.counts).toEqual({ connections: 0, requests: 0, bytes: 0, spliced: 0 })
    expect((await fetch(src.port, '/after')).body).toBe('src:/after')
  })

  it('the rehearsal answers a held GET (re-sent, relayed) and a chunked POST (proxied) with servers of its own; the service sees nothing, nothing is left open', async () => {
    const src = await listen('src')
    const f = new Forwarder()
    f.serve(src.server)
    const open = () => process.getActiveResourcesInfo().filter((r) => r === 'TCPServerWrap' || r === 'TCPSocketWrap').length
    const before = open()
    expect(await rehearseForwarding()).toBe(true)
    await turn()
    expect(open()).toBeLessThanOrEqual(before) // (an earlier test's sockets may close meanwhile)
    expect(src.seen).toEqual([])
    expect(f.counts).toEqual({ connections: 0, requests: 0, bytes: 0, spliced: 0 })
    expect((await fetch(src.port, '/after')).body).toBe('src:/after')
  })

  it('a rehearsal that cannot finish in time ends anyway (false), never rejects', async () => {
    expect(await rehearseForwarding(0)).toBe(false)
  })

  it('after the hand-off: held requests and new connections reach the destination, then idle', async () => {
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
    expect(r.connection).toBe('close') // the client asked for it (agent: false)
    expect((await fetch(src.port, '/new')).body).toBe('dst:/new')
    expect(src.seen).toEqual([])
    expect(dst.seen).toEqual(['/held', '/new'])
    expect(f.counts.requests).toBe(1)
    // the held request's connection is relayed too where the native relay is
    expect(f.counts.connections).toBe(nativeRelay ? 2 : 1)
    await turn()
    expect(f.idleFor(10)).toBe(true)
    expect(f.idleFor(60_000)).toBe(false)
  })

  it.skipIf(!nativeRelay)('a held request keeps its connection: re-sent to the destination, then the connection is relayed raw', async () => {
    const { src, dst, f, c } = await heldThenForwarded('POST /held HTTP/1.1\r\nHost: a\r\nX-Two: 1\r\nX-Two: 2\r\nContent-Length: 5\r\n\r\nhello')
    const first = await c.next()
    expect(first.body).toBe('dst:/held')
    expect(first.head).not.toMatch(/connection: close/i) // the client keeps its keep-alive connection
    c.send('GET /again HTTP/1.1\r\nHost: a\r\n\r\n') // same connection, now relayed byte for byte
    expect((await c.next()).body).toBe('dst:/again')
    expect(src.seen).toEqual([])
    expect(dst.seen).toEqual(['/held hello', '/again'])
    expect(f.counts).toMatchObject({ requests: 1, connections: 1, spliced: 1 })
    c.socket.destroy()
  })

  it.skipIf(!nativeRelay)('a keep-alive connection from before the hand-off: pipelined requests after it reach the destination in order', async () => {
    const src = await listen('src'), dst = await listen('dst')
    const f = new Forwarder()
    f.serve(src.server)
    const c = rawClient(src.port)
    c.send('GET /before HTTP/1.1\r\nHost: a\r\n\r\n')
    expect((await c.next()).body).toBe('src:/before')
    f.hold()
    f.forwardTo([{ host: '127.0.0.1', port: dst.port }])
    c.send('GET /one HTTP/1.1\r\nHost: a\r\n\r\nGET /two HTTP/1.1\r\nHost: a\r\n\r\n')
    expect((await c.next()).body).toBe('dst:/one')
    expect((await c.next()).body).toBe('dst:/two')
    expect(src.seen).toEqual(['/before'])
    expect(dst.seen).toEqual(['/one', '/two'])
    expect(f.counts).toMatchObject({ connections: 1, spliced: 1 })
    c.socket.destroy()
  })

  it.skipIf(!nativeRelay)('pipelined requests held together go on one relayed connection, in order', async () => {
    const { dst, f, c } = await heldThenForwarded('GET /one HTTP/1.1\r\nHost: a\r\n\r\nPOST /two HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nxyz')
    expect((await c.next()).body).toBe('dst:/one')
    expect((await c.next()).body).toBe('dst:/two')
    expect(dst.seen).toEqual(['/one', '/two xyz'])
    expect(f.counts).toMatchObject({ requests: 2, connections: 1, spliced: 1 })
    c.socket.destroy()
  })

  it.skipIf(!nativeRelay)('a request whose body cannot be re-sent as it came (chunked) is proxied, connection: close', async () => {
    const { dst, f, c } = await heldThenForwarded('POST /chunked HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n')
    const r = await c.next()
    expect(r.body).toBe('dst:/chunked')
    expect(r.head).toMatch(/connection: close/i)
    expect(dst.seen).toEqual(['/chunked abc'])
    expect(f.counts).toMatchObject({ requests: 1, connections: 0, spliced: 0 })
    c.socket.destroy()
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
