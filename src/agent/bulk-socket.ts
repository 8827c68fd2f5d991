/**
 * The bulk connection's kernel socket settings in each phase, on both sides
 * (sizes: protocol/messages.ts). Before the hand-off no page request can wait
 * behind bulk data: large buffers, only if the kernel grants them whole (else
 * its autotuning). From it a fault's page may be in the push: small buffers,
 * and on the sending side a cap on bytes written but not sent.
 */
import type { NativeBinding } from '../binding'
import type { Channel } from '../protocol/channel'
import { precopyBulkBuffers } from '../protocol/messages'

type SocketSetters = Pick<NativeBinding, 'setSocketBuffers' | 'setSocketUnsentLimit'>

export function precopyBulkSocket(ch: Channel, binding: SocketSetters, postcopyBytes: number): void {
  ch.limitKernelBuffers(binding.setSocketBuffers, precopyBulkBuffers(postcopyBytes), true)
}

/** unsentBytes: the pushing side's cap (0: none; the destination pushes nothing). */
export function postcopyBulkSocket(ch: Channel, binding: SocketSetters, bytes: number, unsentBytes = 0): void {
  ch.limitKernelBuffers(binding.setSocketBuffers, bytes)
  ch.limitUnsent(binding.setSocketUnsentLimit, unsentBytes)
}
