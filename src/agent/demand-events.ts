/**
 * The native demand path's events (native/demand_wire.h): the threads that
 * answer and install page requests report to the agent in batches of
 * five-number records (kind, a, b, c, d). The path is used when both sides'
 * addons have it and the connections are TCP; UFFD_MIGRATE_DEMAND=js keeps
 * every fault in JavaScript (for comparison).
 */
import { constants as osConstants } from 'node:os'
import type { NativeBinding } from '../binding'
import { ErrorCode, linkErrnoMeaning, migrationError, type UffdMigrateError } from '../errors'
import { integrityError, notARecordError } from '../protocol/records'

export const enum DemandEv {
  FAULT = 1, // source: (region, first page of a requested run)
  SENT = 2, // source: (region, first, count) sent on the demand connection
  ARRIVED = 3, // destination: (region, first, count, pages newly marked received)
  LATENCY = 4, // destination: (fault to install, us; 1 = the push installed it, 0 = the thread's reply)
  ZERO_FAULT = 5, // destination: (region, page) local known-zero page, zero-filled
  NET_FAULT = 6, // destination: (region, page) asked of the source
  CLOSED = 7, // either: (errno, how: LinkEnd); errno 0 = end of stream
  CPU = 8, // either, as the thread ends: its CPU time, ms
  FRAME = 9, // bulk reader: (index in the batch's frames, type): a frame for the message table, in order
  RECEIVED = 10, // bulk reader, pre-copy: (change of the received count)
  TWICE = 11, // bulk reader, post-copy: (pages that arrived again, already held)
  INSTALL_FAILED = 12, // either destination thread: (errno, region, first page, pages) could not be placed
}

/** How a native thread's connection ended: CLOSED's second number (native/records.h). */
export const enum LinkEnd {
  ENDED = 0, // the socket's end or error (errno)
  MALFORMED = 1, // a frame that breaks the protocol
  NOT_A_RECORD = 2, // sealed: bytes that are not a record
  TAG_FAILED = 3, // sealed: a record whose tag failed (changed, dropped, replayed, reordered on the way)
}

const NUMBERS = 5

export function eachDemandEvent(ev: Float64Array, fn: (kind: DemandEv, a: number, b: number, c: number, d: number) => void): void {
  for (let i = 0; i + NUMBERS <= ev.length; i += NUMBERS) fn(ev[i] as DemandEv, ev[i + 1], ev[i + 2], ev[i + 3], ev[i + 4])
}

/** Both native demand classes are built in, and nobody asked for the JS path. */
/** The native bulk reader is built in, and nobody asked for the JS path (UFFD_MIGRATE_BULK=js). */
export function nativeBulkAvailable(binding: NativeBinding): boolean {
  return binding.BulkReader !== undefined && process.env.UFFD_MIGRATE_BULK !== 'js'
}

export function nativeDemandAvailable(binding: NativeBinding): boolean {
  return binding.DemandServer !== undefined && binding.DemandClient !== undefined && process.env.UFFD_MIGRATE_DEMAND !== 'js'
}

/**
 * The error a native thread's CLOSED event (demand or bulk connection) stands for: a broken link
 * (recovered in post-copy), a record whose integrity check failed (a broken link as well), or a peer that broke the
 * protocol.
 */
export function nativeLinkError(errno: number, how: number, connection = 'demand'): UffdMigrateError {
  if (how === LinkEnd.TAG_FAILED) return integrityError(connection)
  if (how === LinkEnd.NOT_A_RECORD) return notARecordError(connection, 'bytes that are not one (or a record over 256 KiB)')
  if (how === LinkEnd.MALFORMED) return migrationError(ErrorCode.PROTOCOL, `the peer sent a malformed frame on the ${connection} connection`)
  if (errno === 0) return migrationError(ErrorCode.CONNECTION, `${connection} connection closed by the peer`) // a clean end: no cause
  // a reset or a timeout, as a socket error would say it (the cause tells a broken link from a peer that hung up)
  const name = errnoName(errno)
  const cause = Object.assign(new Error(`read ${name}`), { code: name, errno })
  return migrationError(ErrorCode.CONNECTION, `${connection} connection failed: read ${name}${linkErrnoMeaning(name)}`, cause)
}

/**
 * INSTALL_FAILED: pages this destination could not place (UFFDIO_COPY or
 * UFFDIO_ZEROPAGE failed past its retries; ENOMEM: the host or the service's
 * memory cgroup is out of memory). A service thread blocked on them would
 * never wake, so the migration stops here, loudly (the source hears why).
 */
export function installFailedError(errno: number, region: number, first: number, count: number): UffdMigrateError {
  const name = errnoName(errno)
  const cause = Object.assign(new Error(`UFFDIO_COPY ${name}`), { code: name, errno, syscall: 'UFFDIO_COPY' })
  const hint = name === 'ENOMEM' ? ': the destination is out of memory (its memory cgroup limit, or the host\'s); free memory there or raise the limit, then migrate again' : ''
  return migrationError(ErrorCode.ABORTED, `the destination could not place ${count} page(s) of region ${region} from page ${first}: ${name}${hint}`, cause)
}

/** 'ENOMEM' for 12, as a socket or syscall error would name it; `errno N` if this platform has no name for it. */
function errnoName(errno: number): string {
  return Object.entries(osConstants.errno).find(([, v]) => v === errno)?.[0] ?? `errno ${errno}`
}
