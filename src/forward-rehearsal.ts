/**
 * The forwarder's hand-off, rehearsed on loopback with servers of its own.
 * Code that first runs at a hand-off runs cold: Node loads and compiles its
 * HTTP internals, V8 interprets without feedback. On a busy 2-vCPU host that
 * was most of the client's worst latency in post-copy: the destination's
 * service took 20-90 ms from accepting the first relayed connections to its
 * first request handler, and the source's forwarder 4 ms of CPU for eight held
 * requests. So when a migration begins, both sides run that path once:
 * - the source, where the service serves HTTP through guest.serve(): a
 *   throwaway Forwarder holds two requests as at pause() and forwards them
 *   to a second local server, one re-sent raw with its connection relayed
 *   (native relay), one chunked and proxied through Node's HTTP client;
 * - the destination, told by REGIONS that the source's service serves HTTP:
 *   the same, so its HTTP server path (accept, parse, answer) is warm when
 *   the service restored there gets its first requests.
 * The service and its servers see nothing of it; nothing is left open. V8
 * drops the bytecode of functions it has not run for a while, so this runs at
 * every migration, not once per process.
 */
import { createServer, type Server } from 'node:http'
import { connect, type Socket } from 'node:net'
import { Forwarder } from './forwarder'

const REQUESTS = [
  'GET /rehearsal HTTP/1.1\r\nhost: localhost\r\n\r\n',
  'POST /rehearsal HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n',
]

/** Runs the rehearsal: true when both requests were answered through the forwarder; never rejects (one that fails or takes longer than timeoutMs just ends). */
export async function rehearseForwarding(timeoutMs = 2000): Promise<boolean> {
  const target = createServer((req, res) => {
    req.resume()
    req.once('end', () => res.end('ok'))
  })
  const front = createServer()
  const forwarder = new Forwarder()
  const clients: Socket[] = []
  let over = false
  let stop = () => {}
  const stopped = new Promise<void>((r) => (stop = r))
  const run = async (): Promise<boolean> => {
    const [targetPort, frontPort] = [await listen(target), await listen(front)]
    if (over) return false
    forwarder.serve(front)
    forwarder.hold()
    // after hold(): this listener runs after the forwarder's, which holds the request
    const held = new Promise<void>((r) => front.on('request', () => forwarder.heldCount >= REQUESTS.length && r()))
    const replies = REQUESTS.map((request) => exchange(frontPort, request, clients))
    for (const r of replies) r.catch(() => {}) // awaited below, unless the rehearsal ends first
    await Promise.race([held, stopped])
    if (over) return false
    forwarder.forwardTo([{ host: '127.0.0.1', port: targetPort }])
    await Promise.all(replies)
    return true
  }
  // every step ends once `over` is set (stop()) and the clients are gone: `ran` always settles
  const ran = run().catch(() => false)
  let timer: NodeJS.Timeout | undefined
  const answered = await Promise.race([ran, new Promise<boolean>((r) => (timer = setTimeout(() => r(false), timeoutMs)))])
  clearTimeout(timer)
  over = true
  stop()
  for (const c of clients) c.destroy()
  await ran
  forwarder.close()
  await Promise.all([target, front].map((s) => closed(s)))
  return answered
}

function listen(server: Server): Promise<number> {
  return new Promise((resolve, reject) => {
    server.once('error', reject) // (a loopback port: not expected)
    server.listen(0, '127.0.0.1', () => resolve(Forwarder.port(server)!))
  })
}

function closed(server: Server): Promise<void> {
  if (!server.listening) return Promise.resolve()
  server.closeAllConnections()
  return new Promise((resolve) => server.close(() => resolve()))
}

/** Writes a request on a connection of its own; resolves once the answer's status line says 200. */
function exchange(port: number, request: string, clients: Socket[]): Promise<void> {
  return new Promise((resolve, reject) => {
    const c = connect(port, '127.0.0.1', () => c.write(request))
    clients.push(c)
    c.setNoDelay(true)
    c.once('data', (d: Buffer) => (d.toString('latin1').startsWith('HTTP/1.1 200') ? resolve() : reject(new Error('not a 200'))))
    c.once('error', reject)
    c.once('close', () => reject(new Error('closed before an answer')))
  })
}
