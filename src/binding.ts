/**
 * The one place that loads the native addon. Everything native is typed by
 * the NativeBinding interface below; the pure test tier uses a fake with the
 * same interface (src/testing/fake-binding.ts).
 */
import { join } from 'node:path'
import { UffdMigrateError, ErrorCode } from './errors'
import type { SealState } from './protocol/records'

export interface NativeUffd {
  readonly features: number
  readonly ioctls: number
  /** Returns the ioctls the range supports. */
  register(regionId: number, offset: number, length: number, mode: number): number
  unregister(regionId: number, offset: number, length: number): void
  /** UFFDIO_COPY; returns how many pages were already present (EEXIST). */
  copy(regionId: number, offset: number, src: Uint8Array, wake?: boolean): number
  /** UFFDIO_ZEROPAGE; returns how many pages were already present. */
  zeropage(regionId: number, offset: number, length: number, wake?: boolean): number
  wake(regionId: number, offset: number, length: number): void
  writeProtect(regionId: number, offset: number, length: number, protect: boolean, wake?: boolean): void
  /** events: triples [regionId, pageIndex, flags] */
  startFaults(callback: (events: Uint32Array) => void): void
  /** Delivers the fault events queued now to the startFaults callback, synchronously; how many. */
  pollFaults(): number
  close(): void
  /**
   * From now on only close() ends the registrations: a teardown of the agent leaves them (missing pages keep faulting,
   * never read as zero). Returns the held descriptor (a standby agent adopts it: `new Uffd(features, fd, ioctls)`).
   * Absent in the fake binding.
   */
  holdRegistrations?(): number
  readonly fd: number
}

/** The forwarder's relay: one thread splices every handed-over pair of sockets (native/relay.cc). */
export interface NativeRelay {
  /** Takes dup()s of both connected sockets; returns the pair's id (reported to onEnded when both directions end). */
  add(clientFd: number, upstreamFd: number): number
  /** CPU time of the relay thread so far, ms. */
  readonly cpuMs: number
  readonly active: number
  close(): void
}

/** Destination: reads the bulk connection and places PAGES and RANGES on its own thread (native/bulk.cc). */
export interface NativeBulkReader {
  /** After HANDOFF (the thread waits for it): post-copy placement rules from now on. */
  resume(postcopy: boolean): void
  /**
   * A new bulk connection after a recovery, with the bytes read from it and not handled; -1: the link broke. Returns
   * the connection's id (0: the constructor's), which its CLOSED event carries.
   */
  attach(fd: number, head?: Uint8Array, seal?: NativeLinkSeal): number
  /** CPU time of the thread so far, ms. */
  readonly cpuMs: number
  /** Bytes read from the bulk connection so far (all of its connections). */
  readonly bytesRead: number
  close(): Float64Array
}

/**
 * Source: writes the bulk connection on its own thread (native/bulk_writer.cc):
 * ready frames and runs of pages, in the order given; pages are split into
 * PAGES frames written from region memory and ZERO ranges, destHas/everSent
 * marked as they go. Each call returns its sequence number.
 */
export interface NativeBulkWriter {
  frame(bytes: Uint8Array): number
  /** runs: (first, count) pairs of one region; takePending: only pages still in the pending map (setPending), taken as they go. */
  pages(region: number, runs: Uint32Array, framePages?: number, takePending?: boolean): number
  setPending(pending: Uint32Array[]): void
  /** The destination reads BATCH: each writev of several frames goes after one announcing its bytes. */
  announceBatches(on: boolean): void
  readonly bytesWritten: number
  /** Bytes of the commands not done yet (frames, and runs counted as full pages). */
  readonly queuedBytes: number
  readonly cpuMs: number
  close(): Float64Array
}

/** A socket's kernel buffers as granted (bytes; 0: left to the kernel's autotuning). */
export interface SocketBuffers {
  sendBytes: number
  receiveBytes: number
}

/**
 * A sealed connection handed to a native thread that seals and opens it itself (native/records.h): the states of
 * the directions it takes over (the demand threads both, the bulk writer send, the bulk reader recv), and the
 * sealed bytes read and not opened.
 */
export interface NativeLinkSeal {
  send?: SealState
  recv?: SealState
  cipherHead?: Uint8Array
}

/** Source: answers PAGE_REQUESTs of a demand connection from region memory on its own thread (native/demand_server.cc). */
export interface NativeDemandServer {
  /** Stops and joins the thread; returns the events not delivered yet (handle them like a batch). */
  close(): Float64Array
}

/** Destination: reads the uffd's faults, asks for them and installs the replies on its own thread. */
export interface NativeDemandClient {
  /**
   * A (new) demand connection, or -1 (the link broke: faults are recorded and asked for on the next one). seal: the
   * thread seals and opens it itself (an encrypted migration). Returns the connection's id, which its CLOSED event
   * carries.
   */
  attach(fd: number, seal?: NativeLinkSeal): number
  /** Pages ready() awaits (region index): asked for on the demand connection, installed by the thread. */
  ask(region: number, pages: Uint32Array): void
  /** How long the oldest open fault has waited (0: none). */
  readonly oldestOpenUs: number
  /** CPU time of the thread so far, ms. */
  readonly cpuMs: number
  /** Stops and joins the thread; returns the events not delivered yet (handle them like a batch). */
  close(): Float64Array
}

/** The sync-WP tracker's native side (native/wp_tracker.cc): one thread resolving write faults. */
export interface NativeSyncWpTracker {
  /** Runs written since the last collect, re-protected. */
  collect(regionId: number): Uint32Array
  /** Runs written since the last collect, left alone. */
  peek(regionId: number): Uint32Array
  /** Runs of pages present or swapped (/proc/self/pagemap). */
  present(regionId: number): Uint32Array
  /** cpuMoves: times the thread moved to the CPU of the thread that faulted (followWriter). */
  /** idleClass: the thread runs in SCHED_IDLE now; starved: times its guard moved it back to the normal class. */
  /** collectsMoved: collects whose re-protect ran off the writer's CPU (native/wp_tracker.cc). */
  readonly stats: { wpFaults: number; missingFaults: number; failures: number; lastErrno: number; cpuMs: number; cpuMoves: number; idleClass: boolean; starved: number; collectsMoved: number }
  /** Joins the thread and ends tracking (closing the userfaultfd drops the protection). */
  close(): void
}

export interface ProbeResult {
  features: number
  ioctls: number
  error?: UffdMigrateError
  /** 0 when the syscall works, else the errno name */
  viaSyscall: 0 | string
  viaDevice: 0 | string
  pagemapScan: 0 | string
}

export interface NativeBinding {
  init(errorClass: Function): void
  readonly pageSize: number
  readonly constants: Record<string, number>
  regionCreate(bytes: number): { id: number; buffer: ArrayBuffer }
  regionOpen(id: number): ArrayBuffer
  regionRelease(buffer: ArrayBuffer): boolean
  discard(regionId: number, offset: number, length: number): void
  /**
   * Drops the range and places zero pages there through the userfaultfd that holds the region's missing-page
   * registration (a destination's, until it settles): it reads zero at once and a touch never faults. Returns the
   * pages filled, -1 when no userfaultfd holds the region, or -errno (not thrown). Absent in the fake binding.
   */
  discardRegistered?(regionId: number, offset: number, length: number): number
  /** MADV_DONTNEED of many (firstPage, pageCount) runs at once (process_madvise where the kernel allows it); returns the system calls made. */
  discardRuns(regionId: number, runs: Uint32Array): number
  /** Runs of [firstPage, pageCount] relative to the region. */
  pagemapScan(
    regionId: number,
    firstPage: number,
    pageCount: number,
    flags: number,
    categoryMask: number,
    categoryInverted: number,
    categoryAnyof: number,
    returnMask: number,
    /** The walk split over up to this many threads (default 1), each with at least 512 MiB: only while the CPUs are otherwise idle (the paused hand-off). */
    threads?: number,
  ): Uint32Array
  /** Every page of the range write-protected, present or not (a region registered for WP with WP_ASYNC): PAGEMAP_SCAN's exclusive write-protect. */
  pagemapProtectAll(regionId: number, firstPage: number, pageCount: number): void
  zeroPages(regionId: number, firstPage: number, pageCount: number, out: Uint8Array): number
  /**
   * SO_SNDBUF / SO_RCVBUF of a socket fd (0: leave alone), past net.core.wmem_max / rmem_max with CAP_NET_ADMIN,
   * else up to them; whole: not at all where they would cut it (the kernel's autotuning keeps that buffer). Returns
   * what the kernel granted (0: left alone).
   */
  setSocketBuffers(fd: number, sendBytes: number, receiveBytes: number, whole?: boolean): SocketBuffers
  /** TCP_NOTSENT_LOWAT: a writer waits while more than `bytes` written are not sent yet (what is in flight is not limited). */
  setSocketUnsentLimit(fd: number, bytes: number): void
  /** SO_MAX_PACING_RATE: the kernel sends at most bytesPerSec from this socket (0: no limit); returns what it holds. */
  setSocketPacing(fd: number, bytesPerSec: number): number
  /** Keepalive probes every second and TCP_USER_TIMEOUT: a silent peer fails the connection after ~timeoutMs (>= 1000). */
  setSocketLiveness(fd: number, timeoutMs: number): void
  /** Nice value (0..19) of the calling thread only. */
  setThreadNice(nice: number): void
  /** Ends the process at once with this exit code, from any thread, running no JavaScript (absent in the fake binding). */
  exitProcess?(code: number): never
  /**
   * The exit watch of a destination in post-copy (native/exit_watch.cc; absent in the fake binding): a plain thread
   * that ends the process with `code` after `ms` unless the service's thread takes the failure (a thread blocked on a
   * page that cannot arrive never does). Armed at the hand-off, it also counts down when the agent's thread ends.
   */
  exitWatchCreate?(): number
  /** The calling agent's end is watched from now on (as it starts: its teardown hook then runs after its threads'). */
  exitWatchBind?(id: number): void
  /** will: what a standby agent needs to take over (JSON), written to it when the calling agent's environment ends. */
  exitWatchArm?(id: number, code: number, ms: number, line: string, will?: string): boolean
  /** A standby's end of a socket pair: the armed agent's will arrives there (one line) when that agent ends. */
  exitWatchSucceed?(id: number): number
  /** Settled, or a receiver's agent crashed before the service started: idle again; returns the will it held (its held userfaultfd is the caller's to close now). */
  exitWatchDisarm?(id: number): string | undefined
  exitWatchFire?(id: number, code: number, ms: number, line: string): boolean
  exitWatchTake?(id: number): void
  /** CPU time (user + system) of the calling thread, ms (absent in the fake binding). */
  threadCpuMs?(): number
  /** adoptFd: a descriptor an agent that crashed held (holdRegistrations()), taken over with its features and ioctls. */
  Uffd: new (features: number, adoptFd?: number, ioctls?: number) => NativeUffd
  probe(): ProbeResult
  /** The native demand path (absent in the fake binding: faults stay in JS there). pending/received: page bitmaps' words. */
  DemandServer?: new (fd: number, regionIds: number[], pending: Uint32Array[], onEvents: (ev: Float64Array) => void, head?: Uint8Array, seal?: NativeLinkSeal) => NativeDemandServer
  BulkReader?: new (
    uffdFd: number, regionIds: number[], received: Uint32Array[], knownZero: Uint32Array[], freedHere: Uint32Array[],
    fd: number, head: Uint8Array, onEvents: (ev: Float64Array, frames: Buffer[]) => void, lazyZero?: boolean, seal?: NativeLinkSeal,
  ) => NativeBulkReader
  /** seal: { send } (an encrypted migration): the thread seals what it writes. */
  BulkWriter?: new (fd: number, regionIds: number[], destHas: Uint32Array[], everSent: Uint32Array[], onEvents: (ev: Float64Array) => void, seal?: NativeLinkSeal) => NativeBulkWriter
  Relay?: new (onEnded: (ended: Float64Array) => void) => NativeRelay
  /** The native threads seal and open encrypted migrations' connections themselves (native/records.h). */
  nativeSealing?: boolean
  /** Synchronous write-protect tracking (absent in the fake binding). */
  /** followWriter (default true): the thread runs on the CPU of the last thread that faulted (native/wp_tracker.cc). */
  SyncWpTracker?: new (regionIds: number[], followWriter?: boolean, idleClass?: boolean) => NativeSyncWpTracker
  /** Whether the sync-WP fault thread can run in SCHED_IDLE here (the process may take a thread out of it again). */
  syncWpIdleClass?: () => boolean
  DemandClient?: new (uffdFd: number, regionIds: number[], received: Uint32Array[], onEvents: (ev: Float64Array) => void) => NativeDemandClient
}

let cached: NativeBinding | undefined

export function loadBinding(): NativeBinding {
  if (cached) return cached
  const root = join(__dirname, '..')
  const tried: string[] = []
  if (process.platform !== 'linux') {
    throw new UffdMigrateError(
      `uffd-migrate runs on Linux only (userfaultfd); this is ${process.platform}`,
      ErrorCode.ADDON,
    )
  }
  let binding: NativeBinding
  try {
    if (process.env.UFFD_MIGRATE_ADDON) {
      tried.push(process.env.UFFD_MIGRATE_ADDON)
      binding = require(process.env.UFFD_MIGRATE_ADDON) as NativeBinding
    } else {
      tried.push(`node-gyp-build(${root})`)
      // eslint-disable-next-line @typescript-eslint/no-var-requires
      binding = require('node-gyp-build')(root) as NativeBinding
    }
  } catch (err) {
    throw new UffdMigrateError(
      `could not load the uffd-migrate native addon (tried ${tried.join(', ')}): ${(err as Error).message}. ` +
        'Rebuild it with `npm rebuild uffd-migrate` (needs python3, make and g++), ' +
        'then run `npx uffd-migrate doctor` to check the kernel features.',
      ErrorCode.ADDON,
      { cause: err },
    )
  }
  binding.init(UffdMigrateError)
  cached = binding
  return binding
}
