/**
 * The service's address follows the service. The service hands its
 * listening servers to the guest (guest.serve(server)); at the hand-off the
 * listening sockets stay open, so a client is never refused:
 * - while the service is paused, requests (HTTP) or new connections (any
 *   other server) are held, not refused; if the migration is cancelled or
 *   fails before the hand-off they go to the service as if nothing happened;
 * - once the destination's service address is known, every new connection
 *   is relayed byte for byte to the destination's service, and so is the
 *   connection of each held request: the request, already parsed here, is
 *   written to the destination again (its head from the parsed fields, its
 *   body as read) and from then on that connection's bytes are relayed, so
 *   the client keeps its keep-alive connection. A request that cannot be
 *   re-sent that way (chunked or unfinished body, `expect`, pipelined, no
 *   native relay) is proxied through Node's HTTP client instead, its reply
 *   saying `connection: close` so that the client comes back on a new,
 *   relayed connection;
 * - the source process lives as this forwarder until the destination settled
 *   and no connection used it for forwardIdleMs.
 * Relayed connections are handed to a native thread (native/relay.cc:
 * splice(2), no byte in JS) once both ends are connected and nothing waits in
 * Node's buffers; UFFD_MIGRATE_RELAY=js keeps them in JS pipes.
 */
import { readFileSync } from 'node:fs'
import { request as httpRequest, Server as HttpServer, type IncomingMessage, type ServerResponse } from 'node:http'
import { connect, type Server, type Socket } from 'node:net'
import { loadBinding, type NativeRelay } from './binding'
import type { ForwardingStatus } from './control'
import { ErrorCode, UffdMigrateError } from './errors'
import { socketFd, takeSocket } from './socket-fd'

type Listener = (...args: unknown[]) => void

interface Served {
  server: Server
  /** An http.Server: requests are held and proxied one by one; else connections are. */
  http: boolean
  saved?: { request: Listener[]; connection: Listener[] }
}

export interface ForwardTarget {
  host: string
  port: number
}

export class Forwarder {
  private readonly served: Served[] = []
  private heldRequests: { server: Served; req: IncomingMessage; res: ServerResponse }[] = []
  private heldSockets: { server: Served; socket: Socket }[] = []
  /** Per served server (same order): where its traffic goes after the hand-off. */
  private targets: (ForwardTarget | undefined)[] = []
  private holding = false
  private active = 0
  private lastUseMs = Date.now()
  /** Connections relayed and requests proxied, for the log line at exit. */
  readonly counts = { connections: 0, requests: 0, bytes: 0, spliced: 0 }
  /** This (the service's main) thread's CPU time when forwarding began (ns; undefined: not forwarding). */
  private cpuAtStartNs: number | undefined
  /** The native relay thread (created at the first relayed connection) and what to do when one of its pairs ends. */
  private relayer: NativeRelay | undefined
  private readonly relayed = new Map<number, (bytes: number) => void>()
  /** Connections of parsed requests until the relay has them: the requests' bytes, in order, to send first. */
  private readonly parsedAhead = new Map<Socket, Buffer[]>()

  /**
   * CPU time of this thread since forwarding began, plus the native relay
   * thread's, in ms: the forwarder's cost (the service is paused and the
   * migration agent has its own thread).
   */
  get cpuMs(): number {
    return this.cpuAtStartNs === undefined ? 0 : (mainThreadCpuNs() - this.cpuAtStartNs) / 1e6 + (this.relayer?.cpuMs ?? 0)
  }

  get serving(): boolean {
    return this.served.length > 0
  }

  get servesHttp(): boolean {
    return this.served.some((s) => s.http)
  }

  /** Requests held since pause(), not forwarded yet. */
  get heldCount(): number {
    return this.heldRequests.length
  }

  status(): ForwardingStatus {
    const { connections, requests, bytes } = this.counts
    return { open: this.active, held: this.heldRequests.length + this.heldSockets.length, connections, requests, bytes, idleMs: Date.now() - this.lastUseMs }
  }

  /** Idle: nothing in flight and nothing new for ms. */
  idleFor(ms: number): boolean {
    const s = this.status()
    return s.open === 0 && s.held === 0 && s.idleMs >= ms
  }

  serve(server: Server): number {
    if (!server || typeof server.on !== 'function' || typeof server.address !== 'function') {
      throw new UffdMigrateError('expected guest.serve() to get a net.Server or http.Server', ErrorCode.INVALID_ARG)
    }
    const existing = this.served.findIndex((s) => s.server === server)
    if (existing >= 0) return existing
    this.served.push({ server, http: server instanceof HttpServer })
    return this.served.length - 1
  }

  /** The ports the served servers listen on, in serve() order (null: not listening). */
  ports(): (number | null)[] {
    return this.served.map((s) => Forwarder.port(s.server) ?? null)
  }

  /** The port a served server listens on (once it listens). */
  static port(server: Server): number | undefined {
    const a = server.address()
    return typeof a === 'object' && a ? a.port : undefined
  }

  /** pause(): from now on requests and connections wait here instead of reaching the service. */
  hold(): void {
    if (this.holding) return
    this.holding = true
    for (const s of this.served) {
      s.saved = { request: s.server.listeners('request') as Listener[], connection: s.server.listeners('connection') as Listener[] }
      if (s.http) {
        s.server.removeAllListeners('request')
        s.server.on('request', (req: IncomingMessage, res: ServerResponse) => this.onRequest(s, req, res))
      } else {
        s.server.removeAllListeners('connection')
        s.server.on('connection', (socket: Socket) => this.onConnection(s, socket))
      }
    }
  }

  /** The migration did not happen (cancelled, failed before the hand-off): everything goes to the service again. */
  release(): void {
    if (!this.holding) return
    this.holding = false
    for (const s of this.served) {
      if (!s.saved) continue
      s.server.removeAllListeners('request')
      s.server.removeAllListeners('connection')
      for (const l of s.saved.request) s.server.on('request', l)
      for (const l of s.saved.connection) s.server.on('connection', l)
      s.saved = undefined
    }
    const requests = this.heldRequests, sockets = this.heldSockets
    this.heldRequests = []
    this.heldSockets = []
    for (const h of requests) {
      // as the service would have got it: not paused (it flows from the next tick, after the handler's listeners)
      h.req.resume()
      h.server.server.emit('request', h.req, h.res)
    }
    for (const h of sockets) {
      h.server.server.emit('connection', h.socket)
      h.socket.resume()
    }
  }

  /**
   * The destination's service listens at these addresses (one per served
   * server, in serve() order): held traffic goes there now, and so does
   * everything that arrives from now on.
   */
  forwardTo(targets: (ForwardTarget | undefined)[]): void {
    this.cpuAtStartNs ??= mainThreadCpuNs()
    this.targets = targets
    for (const s of this.served) {
      if (!s.http) continue
      // new connections are relayed raw; the http parser keeps only the keep-alive connections it has
      s.server.removeAllListeners('connection')
      s.server.on('connection', (socket: Socket) => this.onConnection(s, socket))
    }
    const requests = this.heldRequests, sockets = this.heldSockets
    this.heldRequests = []
    this.heldSockets = []
    // held requests in order, one connection at a time (a pipelining client can have several held)
    const perSocket = new Map<Socket, typeof requests>()
    for (const h of requests) {
      const list = perSocket.get(h.req.socket) ?? []
      list.push(h)
      perSocket.set(h.req.socket, list)
    }
    for (const held of perSocket.values()) this.forwardParsed(held)
    for (const h of sockets) this.relay(h.server, h.socket)
  }

  /** Requests parsed here, of one connection, once the destination is known: relayed raw if all can be re-sent, else proxied. */
  private forwardParsed(parsed: { server: Served; req: IncomingMessage; res: ServerResponse }[]): void {
    const { server, req, res } = parsed[0]
    const queued = this.parsedAhead.get(req.socket)
    if (queued) {
      // pipelined behind a request whose connection is being relayed: it goes after it
      if (canResend(req)) queued.push(resendBytes(req))
      else req.socket.destroy() // its bytes cannot be rebuilt, and the connection's order is the relay's now
      return
    }
    if (!this.nativeRelay() || !parsed.every((h) => canResend(h.req))) {
      for (const h of parsed) this.proxy(h.server, h.req, h.res)
      return
    }
    this.counts.requests += parsed.length
    this.relay(server, req.socket, { head: Buffer.concat(parsed.map((h) => resendBytes(h.req))), res })
  }

  private target(s: Served): ForwardTarget | undefined {
    return this.targets[this.served.indexOf(s)]
  }

  private onRequest(s: Served, req: IncomingMessage, res: ServerResponse): void {
    this.lastUseMs = Date.now()
    if (!this.target(s)) {
      req.pause()
      this.heldRequests.push({ server: s, req, res })
      return
    }
    // the parser finishes a request without a body after this event, in the same read (req.complete then)
    process.nextTick(() => this.forwardParsed([{ server: s, req, res }]))
  }

  private onConnection(s: Served, socket: Socket): void {
    this.lastUseMs = Date.now()
    if (!this.target(s)) {
      socket.pause()
      this.heldSockets.push({ server: s, socket })
      return
    }
    this.relay(s, socket)
  }

  /** A migration begins: the native relay thread starts now, not at the hand-off. True: rehearse the HTTP path (src/forward-rehearsal.ts). */
  prepare(): boolean {
    if (this.serving) this.nativeRelay()
    return this.servesHttp
  }

  /** The native relay thread ends (a rehearsal's forwarder; the service's lives as long as its process). */
  close(): void {
    this.relayer?.close()
    this.relayer = undefined
  }

  /** One HTTP request to the destination's service; the reply closes the client's connection. */
  private proxy(s: Served, req: IncomingMessage, res: ServerResponse): void {
    const t = this.target(s)!
    this.active++
    this.counts.requests++
    const done = () => {
      this.active--
      this.lastUseMs = Date.now()
    }
    // the reply closes the connection: the client comes back on a new one, relayed
    const up = httpRequest({ host: t.host, port: t.port, method: req.method, path: req.url, headers: { ...req.headers, connection: 'close' } }, (reply) => {
      res.writeHead(reply.statusCode ?? 502, { ...reply.headers, connection: 'close' })
      reply.on('data', (c: Buffer) => (this.counts.bytes += c.length))
      reply.pipe(res)
      reply.once('end', done)
      reply.once('error', () => res.destroy())
    })
    up.once('error', (err) => {
      done()
      if (!res.headersSent) res.writeHead(502, { connection: 'close' }).end(`uffd-migrate forwarder: ${err.message}\n`)
      else res.destroy()
    })
    req.resume()
    req.pipe(up)
  }

  /**
   * A connection relayed byte for byte to the destination's service. With
   * `parsed`, the connection of a request Node's HTTP server has parsed:
   * Node stops reading it at once (nothing more enters its parser), the
   * request goes first, and a destination that cannot be reached gets a 502
   * on it, as a proxied request would.
   */
  private relay(s: Served, socket: Socket, parsed?: { head: Buffer; res: ServerResponse }): void {
    const t = this.target(s)!
    this.active++
    this.counts.connections++
    let closed = false
    const taken = parsed && takeSocket(socket)
    if (parsed) this.parsedAhead.set(socket, [parsed.head])
    const up = connect({ host: t.host, port: t.port })
    const close = () => {
      if (closed) return
      closed = true
      this.parsedAhead.delete(socket)
      this.active--
      this.lastUseMs = Date.now()
      socket.destroy()
      up.destroy()
    }
    up.setNoDelay(true)
    socket.setNoDelay(true)
    socket.once('close', close)
    socket.once('error', close)
    up.once('close', () => !parsed?.res.writableEnded && close())
    up.once('error', (err) => {
      if (!parsed || parsed.res.headersSent) return close()
      parsed.res.writeHead(502, { connection: 'close' }).end(`uffd-migrate forwarder: ${err.message}\n`, close)
    })
    const relayer = this.nativeRelay()
    if (taken) {
      up.once('connect', () => {
        const head = Buffer.concat([...(this.parsedAhead.get(socket) ?? []), taken.head])
        this.parsedAhead.delete(socket)
        this.handToRelay(relayer!, socket, up, close, { fd: taken.fd, head })
      })
    }
    else if (relayer) up.once('connect', () => this.handToRelay(relayer, socket, up, close))
    else this.pipe(socket, up)
  }

  /** Both ends in JS pipes. */
  private pipe(socket: Socket, up: Socket): void {
    up.on('data', (c: Buffer) => (this.counts.bytes += c.length))
    socket.on('data', (c: Buffer) => (this.counts.bytes += c.length))
    socket.pipe(up)
    up.pipe(socket)
    socket.resume()
    up.resume()
  }

  /**
   * Both ends to the native relay: Node stops reading them, what it had read
   * from either end goes to the other first, and from then on the relay
   * thread moves every byte. Without descriptors the pair stays in JS pipes.
   */
  private handToRelay(relayer: NativeRelay, socket: Socket, up: Socket, close: () => void, taken?: { fd: number; head: Buffer }): void {
    if (socketFd(up) === undefined || (!taken && socketFd(socket) === undefined)) return this.pipe(socket, up)
    const client = taken ?? takeSocket(socket)!, upstream = takeSocket(up)!
    this.counts.bytes += client.head.length + upstream.head.length
    let flushing = 2
    const hand = () => {
      if (--flushing > 0 || socket.destroyed || up.destroyed) return
      this.counts.spliced++
      this.relayed.set(relayer.add(client.fd, upstream.fd), (bytes) => {
        this.counts.bytes += bytes
        close()
      })
    }
    for (const [to, head] of [[up, client.head], [socket, upstream.head]] as const) {
      if (head.length) to.write(head, hand)
      else hand()
    }
  }

  private nativeRelay(): NativeRelay | undefined {
    if (process.env.UFFD_MIGRATE_RELAY === 'js') return undefined
    if (!this.relayer) {
      const Relay = loadBinding().Relay
      if (!Relay) return undefined
      this.relayer = new Relay((ended) => {
        for (let i = 0; i + 3 <= ended.length; i += 3) {
          const done = this.relayed.get(ended[i])
          this.relayed.delete(ended[i])
          done?.(ended[i + 1] + ended[i + 2])
        }
      })
    }
    return this.relayer
  }
}

/** CPU time of the process's main thread, ns (schedstat: the time it ran, ns resolution; 0 where /proc lacks it). */
function mainThreadCpuNs(): number {
  try {
    return Number(readFileSync(`/proc/self/task/${process.pid}/schedstat`, 'utf8').split(' ')[0])
  } catch {
    return 0
  }
}

/**
 * Whether a parsed request can be sent again exactly as it came: not when its
 * body is still arriving or was de-chunked, an `expect` (Node may have
 * answered it), an upgrade, a socket without a descriptor or with bytes of an
 * earlier answer still queued in Node.
 */
function canResend(req: IncomingMessage): boolean {
  const socket = req.socket as Socket | undefined
  const h = req.headers
  if (!socket || socketFd(socket) === undefined || socket.writableLength > 0) return false
  if (!req.complete || h['transfer-encoding'] !== undefined || h.expect !== undefined || h.upgrade !== undefined || req.method === 'CONNECT') return false
  const bodyBytes = Number(h['content-length'] ?? 0)
  return Number.isSafeInteger(bodyBytes) && req.readableLength === bodyBytes
}

/** The request's bytes (canResend): its head from the parsed fields (raw header names, order, repeats) and its body, read here. */
function resendBytes(req: IncomingMessage): Buffer {
  let head = `${req.method} ${req.url} HTTP/${req.httpVersion}\r\n`
  for (let i = 0; i + 1 < req.rawHeaders.length; i += 2) head += `${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}\r\n`
  const body = req.readableLength > 0 ? (req.read(req.readableLength) as Buffer) : Buffer.alloc(0)
  return Buffer.concat([Buffer.from(head + '\r\n', 'latin1'), body])
}
