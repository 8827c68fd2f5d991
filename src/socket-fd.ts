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
 * Stops Node reading the socket: what arrives from now on waits in the kernel
 * for whoever reads the descriptor next. Safe to call twice (Readable.read()
 * may restart reading; call this again after it, in the same tick).
 */
export function stopReading(socket: unknown): void {
  ;(socket as { pause?(): void }).pause?.()
  const h = handleOf(socket)
  if (h?.readStop) {
    h.reading = false
    h.readStop()
  }
}
