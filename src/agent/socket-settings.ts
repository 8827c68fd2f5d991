/**
 * The connections' kernel socket settings, on both sides (sizes:
 * protocol/messages.ts). The bulk connection in each phase: before the
 * hand-off no page request can wait behind bulk data, so large buffers, only
 * if the kernel grants them whole (else its autotuning); from it a fault's
 * page may be in the push, so small buffers and, on the sending side, a cap on
 * bytes written but not sent. Every connection: a peer gone silent is noticed,
 * and the bulk ones keep to the phase's bandwidth.
 */
import type { NativeBinding } from '../binding'
import type { Channel } from '../protocol/channel'
import { precopyBulkBuffers } from '../protocol/messages'

type SocketSetters = Pick<NativeBinding, 'setSocketBuffers' | 'setSocketUnsentLimit'>

/** Pre-copy's larger buffers, only if the kernel grants all of it (one that net.core.rmem_max / wmem_max would cut stays with its autotuning). */
export function precopyBulkSocket(ch: Channel, binding: SocketSetters, postcopyBytes: number): void {
  const bytes = precopyBulkBuffers(postcopyBytes)
  if (bytes > 0) ch.tune((fd) => binding.setSocketBuffers(fd, bytes, bytes, true))
}

/**
 * Post-copy: the kernel's buffers capped (bulk data that sits in them is data an urgent page may wait behind: the
 * pushed copy of a page already in flight), and what is written but not sent (TCP_NOTSENT_LOWAT: a pushed page
 * written after it waits in the sender's queue, not the kernel's; what is in flight is not limited). unsentBytes:
 * the pushing side's cap (0: none; the destination pushes nothing).
 */
export function postcopyBulkSocket(ch: Channel, binding: SocketSetters, bytes: number, unsentBytes = 0): void {
  if (bytes > 0) ch.tune((fd) => binding.setSocketBuffers(fd, bytes, bytes))
  if (unsentBytes > 0) ch.tune((fd) => binding.setSocketUnsentLimit(fd, unsentBytes))
}

/** A peer that stops answering (a link gone silent, no reset) fails the connection after about timeoutMs instead of never. */
export function detectSilence(ch: Channel, setter: NativeBinding['setSocketLiveness'], timeoutMs: number): void {
  if (timeoutMs >= 1000) ch.tune((fd) => setter(fd, timeoutMs))
}

/** The most the socket sends a second (SO_MAX_PACING_RATE; 0: no limit). setter: the addon's setSocketPacing. */
export function paceSocket(ch: Channel, setter: (fd: number, bytesPerSec: number) => unknown, bytesPerSec: number): void {
  try {
    ch.tune((fd) => setter(fd, bytesPerSec))
  } catch {
    // a socket going away as the phase changes: its end is reported where it is read, not here
  }
}
