/**
 * Encrypted migrations on the native data plane: one direction of a sealed
 * connection on a thread of its own (native/seal_relay.cc), so that the bulk
 * threads (the destination's reader, the source's writer) move the pages as
 * they do in plaintext, through a socketpair, while AES-256-GCM runs beside
 * them. Without it (UFFD_MIGRATE_SEAL=js, or an addon without it) a sealed
 * connection stays with the agents' loops (records.ts).
 */
import type { NativeBinding, NativeSealRelay } from '../binding'
import { integrityError, notARecordError, type SealState } from '../protocol/records'
import { DemandEv, eachDemandEvent, nativeLinkError } from './demand-events'
import { NativeThread } from './native-thread'

/** The relay is built in, and nobody asked for the JS path of sealed connections. */
export function nativeSealAvailable(binding: NativeBinding): boolean {
  return binding.SealRelay !== undefined && process.env.UFFD_MIGRATE_SEAL !== 'js'
}

/** What the relay's CLOSED event (errno, kind) means, as the connection's error. */
export function sealRelayError(errno: number, kind: number, connection: string): Error {
  if (kind === 2) return integrityError(connection)
  if (kind === 1) return notARecordError(connection, 'bytes that are not one (or a record over 256 KiB)')
  return nativeLinkError(errno, 0, connection)
}

export class SealRelay {
  private readonly relay: NativeSealRelay
  private readonly thread: NativeThread<NativeSealRelay>
  private closed = false

  /** onClosed: the socket failed, or a record did (the connection is broken); onCpu: the thread ended, its CPU ms. */
  constructor(binding: NativeBinding, mode: 'seal' | 'open', fd: number, state: SealState, head: Uint8Array, hooks: { onClosed(err: Error): void; onCpu(ms: number): void }, connection: string) {
    const onEvents = (ev: Float64Array) => eachDemandEvent(ev, (kind, a, b) => {
      if (kind === DemandEv.CLOSED) hooks.onClosed(sealRelayError(a, b, connection))
      else if (kind === DemandEv.CPU) hooks.onCpu(a)
    })
    this.relay = new binding.SealRelay!(mode, fd, state.key, state.iv, state.seq, state.bytesUnderKey, state.rekeyBytes, head, onEvents)
    this.thread = new NativeThread(this.relay, onEvents)
  }

  /** The descriptor the bulk thread takes (it dup()s it); release() once it did. */
  get innerFd(): number {
    return this.relay.innerFd
  }

  release(): void {
    this.relay.releaseInner()
  }

  /** CPU time so far while it runs (its total arrives through onCpu when it ends). */
  get cpuMs(): number {
    return this.closed ? 0 : this.relay.cpuMs
  }

  close(): void {
    if (this.closed) return
    this.closed = true
    this.thread.close()
  }
}
