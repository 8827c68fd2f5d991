/**
 * Encrypted migrations on the native data plane: one direction of a sealed
 * connection on a thread of its own (native/seal_relay.cc), so that the bulk
 * threads (the destination's reader, the source's writer) move the pages as
 * they do in plaintext, through a socketpair, while AES-256-GCM runs beside
 * them. Without it (UFFD_MIGRATE_SEAL=js, or an addon without it) a sealed
 * connection stays with the agents' loops (records.ts).
 */
import type { NativeBinding, NativeSealRelay } from '../binding'
import type { Channel } from '../protocol/channel'
import { integrityError, notARecordError, type SealState } from '../protocol/records'
import { DemandEv, eachDemandEvent, nativeLinkError } from './demand-events'
import { NativeThread } from './native-thread'

/** The relay is built in, and nobody asked for the JS path of sealed connections. */
export function nativeSealAvailable(binding: NativeBinding): boolean {
  return binding.SealRelay !== undefined && process.env.UFFD_MIGRATE_SEAL !== 'js'
}

/** The kinds of the relay's CLOSED event (native/seal_relay.cc). */
const enum RelayEnd {
  ENDED = 0, // the socket's end or error (errno)
  NOT_A_RECORD = 1,
  TAG_FAILED = 2,
}

/** What the relay's CLOSED event (errno, kind) means, as the connection's error. */
export function sealRelayError(errno: number, kind: number, connection: string): Error {
  if (kind === RelayEnd.TAG_FAILED) return integrityError(connection)
  if (kind === RelayEnd.NOT_A_RECORD) return notARecordError(connection, 'bytes that are not one (or a record over 256 KiB)')
  return nativeLinkError(errno, 0, connection)
}

export class SealRelay {
  private readonly relay: NativeSealRelay
  private readonly thread: NativeThread<NativeSealRelay>
  private closed = false

  /** onClosed: the socket failed, or a record did (the connection is broken); onCpu: the thread ended, its CPU ms. */
  constructor(
    binding: NativeBinding, mode: 'seal' | 'open', fd: number, state: SealState, head: Uint8Array, hooks: { onClosed(err: Error): void; onCpu(ms: number): void },
    connection: string, pairFd?: number,
  ) {
    // the demand connection's relays: a service thread blocked in a fault waits on them (the service's nice value)
    const urgent = connection === 'demand'
    const onEvents = (ev: Float64Array) => eachDemandEvent(ev, (kind, a, b) => {
      if (kind === DemandEv.CLOSED) hooks.onClosed(sealRelayError(a, b, connection))
      else if (kind === DemandEv.CPU) hooks.onCpu(a)
    })
    this.relay = new binding.SealRelay!(mode, fd, state.key, state.iv, state.seq, state.bytesUnderKey, state.rekeyBytes, head, onEvents, pairFd, urgent)
    this.thread = new NativeThread(this.relay, onEvents)
  }

  /** The descriptor the bulk thread takes (it dup()s it); release() once it did. */
  get innerFd(): number {
    return this.relay.innerFd
  }

  /** Its own end of the pair, for the relay of the other direction (SealedDuplex). */
  get outerFd(): number {
    return this.relay.outerFd
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

/**
 * Both directions of a sealed connection on native threads (the demand connection, whose thread both reads and
 * writes it): an 'open' relay and a 'seal' relay sharing one socketpair. fd: the end the demand thread takes (it
 * dup()s it; then release()); head: the plaintext read before (none is expected there).
 */
export class SealedDuplex {
  private constructor(
    private readonly open: SealRelay,
    private readonly seal: SealRelay,
    readonly head: Buffer,
  ) {}

  static take(binding: NativeBinding, ch: Channel, hooks: { onClosed(err: Error): void; onCpu(ms: number): void }, connection: string): SealedDuplex | undefined {
    const t = ch.handOverSealed(true)
    if (!t?.sendState) return undefined
    const open = new SealRelay(binding, 'open', t.fd, t.state, t.cipherHead, hooks, connection)
    let seal: SealRelay
    try {
      seal = new SealRelay(binding, 'seal', t.fd, t.sendState, new Uint8Array(0), hooks, connection, open.outerFd)
    } catch (err) {
      open.close()
      throw err
    }
    return new SealedDuplex(open, seal, t.plainHead)
  }

  get fd(): number {
    return this.open.innerFd
  }

  release(): void {
    this.open.release()
  }

  get cpuMs(): number {
    return this.open.cpuMs + this.seal.cpuMs
  }

  close(): void {
    this.seal.close()
    this.open.close()
  }
}

/** A connection's descriptor for a native thread, the bytes read before, and the relays it goes through (sealed). */
export interface Taken {
  fd: number
  head: Buffer
  through?: SealedDuplex
}

/** A connection one native thread both reads and writes (the demand connection): its socket, or (sealed) seal relays' end. */
export function takeDuplex(binding: NativeBinding, ch: Channel, hooks: { onClosed(err: Error): void; onCpu(ms: number): void }, connection: string): Taken | undefined {
  if (!ch.sealed) return ch.handOver()
  const through = SealedDuplex.take(binding, ch, hooks, connection)
  return through && { fd: through.fd, head: through.head, through }
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
