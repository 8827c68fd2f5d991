import { once } from 'node:events'
import { connect, createServer, type Socket } from 'node:net'

/** Both ends of one loopback TCP connection (the native threads' tests work on real sockets). */
export async function tcpPair(): Promise<{ client: Socket; server: Socket; close(): void }> {
  const srv = createServer()
  srv.listen(0, '127.0.0.1')
  await once(srv, 'listening')
  const port = (srv.address() as { port: number }).port
  const accepted = once(srv, 'connection')
  const client = connect(port, '127.0.0.1')
  await once(client, 'connect')
  const [server] = (await accepted) as [Socket]
  return { client, server, close: () => (client.destroy(), server.destroy(), srv.close()) }
}
