/**
 * Taking a connected net.Socket's descriptor away from Node, for a native
 * thread that moves its bytes from then on (the demand path, the forwarder's
 * relay). Node keeps the socket object (closing it closes Node's descriptor;
 * the thread works on its own dup()) but reads nothing more from it.
 */

interface Handle {
  fd?: number
  reading?: boolean
  readStop?(): number
}

function handleOf(socket: unknown): Handle | undefined {
  return (socket as { _handle?: Handle })._handle
}

/** The socket's descriptor, if it has one (a TCP socket; not an in-memory transport). */
export function socketFd(socket: unknown): number | undefined {
  const fd = handleOf(socket)?.fd
  return typeof fd === 'number' && fd >= 0 ? fd : undefined
}

/**
 * Stops Node reading the socket, for good: what arrives from now on waits in
 * the kernel for whoever reads the descriptor next. Pausing is not enough:
 * a Readable below its high-water mark calls _read() again on the next tick
 * (maybeReadMore), which restarts reading on the handle, and libuv would then
 * take bytes meant for the native thread; so _read becomes a no-op.
 */
function stopReading(socket: unknown): void {
  const s = socket as { pause?(): void; _read?: (n: number) => void }
  s.pause?.()
  if (s._read) s._read = () => {}
  const h = handleOf(socket)
  if (h?.readStop) {
    h.reading = false
    h.readStop()
  }
}

/**
 * Takes a connected socket away from Node for a native thread: Node reads
 * nothing more from it; returns its descriptor and the bytes Node had read
 * and not delivered (the thread's, first). undefined, and the socket left as
 * it was, when it has no descriptor.
 */
export function takeSocket(socket: unknown): { fd: number; head: Buffer } | undefined {
  const fd = socketFd(socket)
  if (fd === undefined) return undefined
  stopReading(socket) // before read(): with _read a no-op, read() cannot start reading again
  const s = socket as { readableLength?: number; read?(n: number): Buffer | null }
  const head = (s.readableLength ?? 0) > 0 ? s.read!(s.readableLength!) : null
  return { fd, head: head ?? Buffer.alloc(0) }
}
