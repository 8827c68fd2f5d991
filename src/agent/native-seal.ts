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
 * A connection a native thread reads from now on (the bulk reader), or both reads and writes (`both`: the demand
 * connection): its socket and, sealed, the states with which that thread opens (and seals) it.
 */
export function takeForThread(ch: Channel, both = false): Taken | undefined {
  if (!ch.sealed) return ch.handOver()
  const t = ch.handOverSealed(both)
  if (!t || (both && !t.sendState)) return undefined
  return { fd: t.fd, head: t.plainHead, seal: { recv: t.state, cipherHead: t.cipherHead, ...(both ? { send: t.sendState } : {}) } }
}

/** takeForThread() of the demand connection, which its thread both reads and writes. */
export function takeDuplex(ch: Channel): Taken | undefined {
  return takeForThread(ch, true)
}
