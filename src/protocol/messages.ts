/**
 * Message types, their encodings and their validation. Control messages are
 * msgpackr maps; page data and ranges are fixed binary layouts so that no
 * per-page JS object is ever made. Every field that comes from the network is
 * checked here (types, bounds, sizes) before anyone acts on it.
 */
import { Packr } from 'msgpackr'
import { ErrorCode, migrationError } from '../errors'
import { frameHeader } from './frames'

export const PROTOCOL_NAME = 'uffd-migrate'
export const PROTOCOL_VERSION = 7

/** Largest page payload in one frame; replies and pushes are cut to fit. */
export const MAX_PAGES_PER_FRAME = 256
/** Default kernel socket buffers of the bulk channel (see src/agent/socket-settings.ts; $UFFD_MIGRATE_BULK_BUFFER_BYTES). */
export const DEFAULT_BULK_SOCKET_BUFFER_BYTES = 512 * 1024
/**
 * Kernel socket buffers of the bulk channel before the hand-off, when no page
 * request can wait behind bulk data: fewer wake-ups and syscalls per GiB
 * (bench: 1 GiB round 0, 4 MiB against 512 KiB: +14% throughput, -18%
 * destination CPU). Both sides shrink to the post-copy size at the hand-off.
 */
export const PRECOPY_BULK_SOCKET_BUFFER_BYTES = 4 << 20

/**
 * The most the source's bulk socket holds written but not sent during the
 * post-copy push (TCP_NOTSENT_LOWAT; $UFFD_MIGRATE_PUSH_UNSENT_BYTES, 0: no
 * limit). A page not yet in the socket can still go as a fault's reply;
 * what is in flight on the link is not limited. 10 alternating pairs of
 * bench:postcopy Table D's case: fault p99 1115 against 1791 us, total
 * +5 % (docs/data-plane.md).
 */
export const DEFAULT_PUSH_UNSENT_BYTES = 128 * 1024

/** The bulk socket's kernel buffers before the hand-off, given the post-copy size (0: left to the kernel). */
export function precopyBulkBuffers(postcopyBytes: number): number {
  return postcopyBytes > 0 ? Math.max(postcopyBytes, PRECOPY_BULK_SOCKET_BUFFER_BYTES) : 0
}

/** Largest control message (hand-off state, discard lists). */
export const MAX_CONTROL_BYTES = 64 << 20
/**
 * Largest frame before a connection has authenticated: HELLO, AUTH, READY
 * and ERROR are a few hundred bytes. An unauthenticated peer can make this
 * side buffer no more than this (plus one socket chunk).
 */
export const MAX_HANDSHAKE_FRAME_BYTES = 4096

export const enum Msg {
  // handshake (both connections)
  HELLO = 1,
  AUTH = 2,
  READY = 3,
  ERROR = 4,
  // session (bulk unless noted)
  REGIONS = 10,
  REGIONS_OK = 11,
  CLOCK = 12, // urgent, both ways
  PREFLIGHT_OK = 13, // bulk, destination -> source: a preflight's REGIONS passed every check; the session ends (version 6)
  PAGES = 20, // bulk (rounds, push) and urgent (replies)
  RANGES = 21, // pages without payload: zero / free
  ROUND_END = 22,
  PRECOPY_END = 23,
  HANDOFF = 24,
  RESUMED = 25,
  PAGE_REQUEST = 30, // urgent, destination -> source
  WILL_NEED = 31, // urgent, destination -> source: prepaging hint
  FREED = 32, // destination -> source: freed during post-copy, do not push
  PUSH_END = 33,
  SETTLED = 34,
  REQUEST_DONE = 35, // urgent, source -> destination: every reply to one PAGE_REQUEST was sent
  RECOVER = 36, // bulk, source -> destination: both connections are back after a break in post-copy
  RECOVER_STATE = 37, // bulk, destination -> source: what the destination holds now
  SERVICE = 38, // bulk, destination -> source: the ports its service listens on (the source's forwarder relays there)
  KEEPALIVE = 39, // urgent, both ways: this side is alive (a quiet link is not a stuck peer); the destination's since version 5
  SYNC = 40, // bulk, both ways in pre-copy: answered once everything sent before it on bulk was applied
  BATCH = 41, // bulk, source -> destination (REGIONS_OK said batch): u32 bytes of frames written with it, follow at once
}

export const MSG_NAMES: Record<number, string> = {
  1: 'HELLO', 2: 'AUTH', 3: 'READY', 4: 'ERROR', 10: 'REGIONS', 11: 'REGIONS_OK', 12: 'CLOCK', 13: 'PREFLIGHT_OK', 20: 'PAGES',
  21: 'RANGES', 22: 'ROUND_END', 23: 'PRECOPY_END', 24: 'HANDOFF', 25: 'RESUMED', 30: 'PAGE_REQUEST',
  31: 'WILL_NEED', 32: 'FREED', 33: 'PUSH_END', 34: 'SETTLED', 35: 'REQUEST_DONE', 36: 'RECOVER', 37: 'RECOVER_STATE', 38: 'SERVICE', 39: 'KEEPALIVE', 40: 'SYNC', 41: 'BATCH',
}

/** Kind of a PAGE_REQUEST (echoed in its REQUEST_DONE). */
export const enum RequestKind {
  READY = 0, // the service awaits ready(): nobody is blocked
  FAULT = 1, // a thread is blocked in a page fault
}

/** Kind of a RANGES entry. */
export const enum RangeKind {
  ZERO = 0, // all zeros or never populated
  FREE = 1, // reported free by the guest (ballooning)
  STALE = 2, // pre-copy only: the copy the destination holds is out of date (a hot page); dropped there now, not at the hand-off
}

const packr = new Packr({ useRecords: false, moreTypes: false })

export function encodeControl(type: Msg, body: object): Buffer[] {
  const payload = packr.pack(body)
  return [frameHeader(type, payload.length), payload]
}

export function decodeControl(type: number, payload: Buffer): Record<string, unknown> {
  let v: unknown
  try {
    v = packr.unpack(payload)
  } catch (err) {
    throw migrationError(ErrorCode.PROTOCOL, `malformed ${MSG_NAMES[type] ?? type} message: ${(err as Error).message}`)
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) {
    throw migrationError(ErrorCode.PROTOCOL, `expected ${MSG_NAMES[type] ?? type} to be a map, got ${typeof v}`)
  }
  return v as Record<string, unknown>
}

// ---- field validation -------------------------------------------------------

export function field<T>(msg: Record<string, unknown>, name: string, kind: 'string' | 'number' | 'boolean' | 'bytes' | 'object' | 'array', what: string): T {
  const v = msg[name]
  const ok =
    kind === 'bytes' ? v instanceof Uint8Array :
    kind === 'array' ? Array.isArray(v) :
    kind === 'object' ? typeof v === 'object' && v !== null :
    kind === 'number' ? typeof v === 'number' && Number.isFinite(v) :
    typeof v === kind
  if (!ok) throw migrationError(ErrorCode.PROTOCOL, `expected ${what}.${name} to be ${kind}, got ${describe(v)}`)
  return v as T
}

export function uint(msg: Record<string, unknown>, name: string, what: string, max = Number.MAX_SAFE_INTEGER): number {
  const v = field<number>(msg, name, 'number', what)
  if (!Number.isInteger(v) || v < 0 || v > max) {
    throw migrationError(ErrorCode.PROTOCOL, `expected ${what}.${name} to be an integer in [0, ${max}], got ${v}`)
  }
  return v
}

function describe(v: unknown): string {
  if (v === null) return 'null'
  if (v instanceof Uint8Array) return `${v.length} bytes`
  return Array.isArray(v) ? 'an array' : typeof v === 'string' ? JSON.stringify(v.slice(0, 40)) : typeof v
}

// ---- binary messages ------------------------------------------------------------

/** Region layout as both sides agreed: index -> page count. */
export interface RegionLayout {
  pageCount: number
}

/** PAGES: u32 region | u32 firstPage | u32 pageCount | pageCount * pageSize bytes. */
export function pagesHeader(region: number, firstPage: number, pageCount: number, pageSize: number): Buffer {
  const h = frameHeader(Msg.PAGES, 12 + pageCount * pageSize)
  const b = Buffer.allocUnsafe(17)
  h.copy(b, 0)
  b.writeUInt32BE(region, 5)
  b.writeUInt32BE(firstPage, 9)
  b.writeUInt32BE(pageCount, 13)
  return b
}

export interface PagesMsg {
  region: number
  firstPage: number
  pageCount: number
  data: Buffer
}

export function decodePages(payload: Buffer, layout: RegionLayout[], pageSize: number): PagesMsg {
  if (payload.length < 12) throw migrationError(ErrorCode.PROTOCOL, `expected a PAGES header of 12 bytes, got ${payload.length}`)
  const region = payload.readUInt32BE(0)
  const firstPage = payload.readUInt32BE(4)
  const pageCount = payload.readUInt32BE(8)
  checkRun(region, firstPage, pageCount, layout, 'PAGES')
  if (pageCount > MAX_PAGES_PER_FRAME) {
    throw migrationError(ErrorCode.PROTOCOL, `expected at most ${MAX_PAGES_PER_FRAME} pages in one PAGES frame, got ${pageCount}`)
  }
  const data = payload.subarray(12)
  if (data.length !== pageCount * pageSize) {
    throw migrationError(ErrorCode.PROTOCOL, `expected ${pageCount * pageSize} bytes of page data, got ${data.length}`)
  }
  return { region, firstPage, pageCount, data }
}

/**
 * BATCH: u32 bytes. The native writer announces the frames it writes in one
 * writev, so that the reader may sleep until they are all in (SO_RCVLOWAT); a
 * hint only, nothing else depends on it.
 */
export function encodeBatch(bytes: number): Buffer {
  const b = Buffer.allocUnsafe(9)
  frameHeader(Msg.BATCH, 4).copy(b, 0)
  b.writeUInt32BE(bytes, 5)
  return b
}

export function decodeBatch(payload: Buffer): number {
  if (payload.length !== 4) throw migrationError(ErrorCode.PROTOCOL, `expected a BATCH of 4 bytes, got ${payload.length}`)
  return payload.readUInt32BE(0)
}

export function checkRun(region: number, firstPage: number, pageCount: number, layout: RegionLayout[], what: string): void {
  if (region >= layout.length) {
    throw migrationError(ErrorCode.PROTOCOL, `expected a region index below ${layout.length} in ${what}, got ${region}`)
  }
  const pages = layout[region].pageCount
  if (pageCount === 0 || firstPage >= pages || pageCount > pages - firstPage) {
    throw migrationError(
      ErrorCode.PROTOCOL,
      `expected pages within [0, ${pages}) of region ${region} in ${what}, got ${firstPage}+${pageCount}`,
    )
  }
}

/**
 * Run lists (RANGES, PAGE_REQUEST, WILL_NEED, FREED, discard lists):
 * u8 kind | u32 region | then (u32 firstPage, u32 pageCount) pairs.
 */
export function encodeRuns(type: Msg, kind: number, region: number, runs: ArrayLike<number>, count = runs.length): Buffer {
  const b = Buffer.allocUnsafe(5 + 5 + count * 4)
  frameHeader(type, 5 + count * 4).copy(b, 0)
  b[5] = kind
  // a DataView, not b.writeUInt32BE(): a round 0 of the page-store sends ~66k entries per GiB, and the Buffer
  // method's range checks took 7.7 of the 57 ms the source's agent thread spent in it (CPU profile)
  const view = new DataView(b.buffer, b.byteOffset, b.byteLength)
  view.setUint32(6, region)
  for (let i = 0; i < count; i++) view.setUint32(10 + i * 4, runs[i])
  return b
}

export interface RunsMsg {
  kind: number
  region: number
  /** [firstPage, pageCount] pairs, validated against the region. */
  runs: Uint32Array
}

export function decodeRuns(type: number, payload: Buffer, layout: RegionLayout[]): RunsMsg {
  const what = MSG_NAMES[type] ?? String(type)
  if (payload.length < 5 || (payload.length - 5) % 8 !== 0) {
    throw migrationError(ErrorCode.PROTOCOL, `expected ${what} of 5 + 8k bytes, got ${payload.length}`)
  }
  const kind = payload[0]
  const region = payload.readUInt32BE(1)
  const n = (payload.length - 5) / 4
  const runs = new Uint32Array(n)
  for (let i = 0; i < n; i += 2) {
    runs[i] = payload.readUInt32BE(5 + i * 4)
    runs[i + 1] = payload.readUInt32BE(9 + i * 4)
    checkRun(region, runs[i], runs[i + 1], layout, what)
  }
  return { kind, region, runs }
}
