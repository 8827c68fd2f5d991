/**
 * Encrypted migrations on the native data plane: the threads that move the
 * pages seal and open their connections themselves (native/records.h), each
 * direction taken over where JS stopped (key, IV, sequence number, bytes
 * under the key), so the records stay one sequence with the control frames
 * JS sealed before. The source's bulk writer seals straight from region
 * memory, the destination's bulk reader opens straight into its staging
 * buffer, the demand threads do both. Without it (UFFD_MIGRATE_SEAL=js, or an
 * addon without it) a sealed connection stays with the agents' loops
 * (records.ts).
 */
import type { NativeBinding, NativeLinkSeal } from '../binding'
import type { Channel } from '../protocol/channel'

/** The addon's threads seal, and nobody asked for the JS path of sealed connections. */
export function nativeSealAvailable(binding: NativeBinding): boolean {
  return binding.nativeSealing === true && process.env.UFFD_MIGRATE_SEAL !== 'js'
}

/** A connection's descriptor for a native thread, the bytes read before, and (sealed) both directions' states for it. */
export interface Taken {
  fd: number
  head: Buffer
  seal?: NativeLinkSeal
}

/**
 * A connection one native thread both reads and writes (the demand connection): its socket and, sealed, the states
 * with which that thread seals and opens it.
 */
export function takeDuplex(ch: Channel): Taken | undefined {
  if (!ch.sealed) return ch.handOver()
  const t = ch.handOverSealed(true)
  return t?.sendState && { fd: t.fd, head: t.plainHead, seal: { send: t.sendState, recv: t.state, cipherHead: t.cipherHead } }
}
