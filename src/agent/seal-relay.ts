/**
 * Encrypted migrations on the native data plane: one direction of a sealed
 * bulk connection on a thread of its own (native/seal_relay.cc), so that the
 * bulk threads (the destination's reader, the source's writer) move the pages
 * as they do in plaintext, through a socketpair, while AES-256-GCM runs beside
 * them; the demand connection's threads seal and open it themselves. Without
 * it (UFFD_MIGRATE_SEAL=js, or an addon without it) a sealed connection stays
 * with the agents' loops (records.ts).
 */
import type { NativeBinding, NativeLinkSeal, NativeSealRelay } from '../binding'
import type { Channel } from '../protocol/channel'
import type { SealState } from '../protocol/records'
import { DemandEv, eachDemandEvent, nativeLinkError } from './demand-events'
import { NativeThread } from './native-thread'

/** The relay is built in, and nobody asked for the JS path of sealed connections. */
export function nativeSealAvailable(binding: NativeBinding): boolean {
  return binding.SealRelay !== undefined && process.env.UFFD_MIGRATE_SEAL !== 'js'
}

export class SealRelay {
  private readonly relay: NativeSealRelay
  private readonly thread: NativeThread<NativeSealRelay>
  private closed = false

  /** onClosed: the socket failed, or a record did (the connection is broken); onCpu: the thread ended, its CPU ms. */
  constructor(
    binding: NativeBinding, mode: 'seal' | 'open', fd: number, state: SealState, head: Uint8Array, hooks: { onClosed(err: Error): void; onCpu(ms: number): void },
    connection: string,
  ) {
    const onEvents = (ev: Float64Array) => eachDemandEvent(ev, (kind, a, b) => {
      if (kind === DemandEv.CLOSED) hooks.onClosed(nativeLinkError(a, b, connection))
      else if (kind === DemandEv.CPU) hooks.onCpu(a)
    })
    this.relay = new binding.SealRelay!(mode, fd, state, head, onEvents)
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

/** A connection's descriptor for a native thread, the bytes read before, and (sealed) both directions' states for it. */
export interface Taken {
  fd: number
  head: Buffer
  seal?: NativeLinkSeal
}

/**
 * A connection one native thread both reads and writes (the demand connection): its socket and, sealed, the states
 * with which that thread seals and opens it itself (native/records.h: a fault's round trip crosses no relay thread).
 */
export function takeDuplex(ch: Channel): Taken | undefined {
  if (!ch.sealed) return ch.handOver()
  const t = ch.handOverSealed(true)
  return t?.sendState && { fd: t.fd, head: t.plainHead, seal: { send: t.sendState, recv: t.state, cipherHead: t.cipherHead } }
}

/** make(fd)'s writer thread on a sealed connection: it writes plaintext into a seal relay that seals it onto fd. */
export function writeThroughSeal<W extends { through(relay: SealRelay): W }>(
  binding: NativeBinding, fd: number, seal: SealState, make: (fd: number) => W, hooks: { onClosed(err: Error): void; onCpu(ms: number): void }, connection: string,
): W {
  const relay = new SealRelay(binding, 'seal', fd, seal, new Uint8Array(0), hooks, connection)
  const writer = make(relay.innerFd)
  relay.release()
  return writer.through(relay)
}
