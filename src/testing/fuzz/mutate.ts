/**
 * Structure-aware mutations of one valid frame. Each knows the frame's
 * layout (header, control map, PAGES header, run list, discard lists) and
 * breaks one thing. None of them turns a frame into another *valid* frame
 * that moves page data somewhere else (a PAGES header re-aimed at another
 * in-range page, a run list that still fits): no receiver can tell those
 * from the truth, so they would only test the fuzzer.
 */
import { Packr } from 'msgpackr'
import { frameHeader } from '../../protocol/frames'
import { MSG_NAMES, Msg } from '../../protocol/messages'

/** The connections the fuzzer writes on (demand and an extra bulk stream: over TCP only, see wire.ts). */
export type FuzzChannel = 'urgent' | 'bulk' | 'demand' | 'stream'

export interface ScriptFrame {
  channel: FuzzChannel
  type: number
  bytes: Buffer
}

export const MUTATIONS = [
  'bitflip', 'wrongType', 'truncate', 'lyingLength', 'outOfRange', 'msgpackType', 'deepNesting', 'crossPhase', 'wrongChannel', 'duplicate', 'emptyBody', 'garbage',
] as const
export type Mutation = (typeof MUTATIONS)[number]

const packr = new Packr({ useRecords: false, moreTypes: false })
const CONTROL = new Set<number>([
  Msg.HELLO, Msg.AUTH, Msg.REGIONS, Msg.CLOCK, Msg.HANDOFF, Msg.REQUEST_DONE, Msg.ROUND_END, Msg.PRECOPY_END, Msg.PUSH_END, Msg.RECOVER, Msg.KEEPALIVE,
  // what only the destination sends (the source-side fuzzer mutates those: source-session.ts)
  Msg.READY, Msg.REGIONS_OK, Msg.PREFLIGHT_OK, Msg.RESUMED, Msg.SETTLED, Msg.RECOVER_STATE, Msg.SERVICE, Msg.ERROR,
])
/** Frames whose payload is a run list: `u8 kind | u32 region | (u32 first, u32 count)*`. */
const RUN_LISTS = new Set<number>([Msg.RANGES, Msg.PAGE_REQUEST, Msg.WILL_NEED, Msg.FREED])

/** What a mutation sends instead of the frame (one or more writes, on a channel). */
export interface Mutated {
  channel: FuzzChannel
  writes: Buffer[]
  /** Frames the mutation put on the wire (for the frame count). */
  frames: number
  /**
   * Pages the mutation may have given other bytes in a frame that is still valid: no receiver can tell those bytes
   * from the truth (see the top), so the session does not count them as wrong.
   */
  blurred?: { region: number; first: number; count: number }
}

function frame(type: number, payload: Buffer): Buffer {
  return Buffer.concat([frameHeader(type, payload.length), payload])
}

/** Values of every msgpack kind but the one a field has. */
function otherKind(v: unknown, rand: () => number): unknown {
  const kinds: unknown[] = ['x', 'a'.repeat(300), -1, 2 ** 53, 1.5, Number.NaN, true, null, [], [1, [2, [3]]], {}, { a: { b: 1 } }, Buffer.alloc(3), Buffer.alloc(40)]
  const pool = kinds.filter((k) => typeof k !== typeof v || Array.isArray(k) !== Array.isArray(v) || Buffer.isBuffer(k) !== Buffer.isBuffer(v))
  return pool[Math.floor(rand() * pool.length)]
}

const CROSS: number[] = [Msg.HELLO, Msg.AUTH, Msg.READY, Msg.REGIONS, Msg.REGIONS_OK, Msg.HANDOFF, Msg.RESUMED, Msg.PAGE_REQUEST, Msg.WILL_NEED, Msg.FREED, Msg.PUSH_END, Msg.SETTLED, Msg.RECOVER, Msg.RECOVER_STATE, Msg.SERVICE, Msg.PRECOPY_END, Msg.ROUND_END, 0, 99, 255]

/** channels: the connections the session has (wrongChannel moves the frame to another of them). */
export function mutate(f: ScriptFrame, kind: Mutation, rand: () => number, layout: number[], channels: readonly FuzzChannel[] = ['urgent', 'bulk']): Mutated {
  const int = (n: number) => Math.floor(rand() * n)
  const payload = f.bytes.subarray(5)
  const one = (bytes: Buffer, channel = f.channel): Mutated => ({ channel, writes: [bytes], frames: 1 })
  switch (kind) {
    case 'bitflip': {
      // the header, or a control map's body (page data stays: a flipped data bit is a valid page)
      const b = Buffer.from(f.bytes)
      const span = CONTROL.has(f.type) ? b.length : 5
      for (let i = 1 + int(8); i > 0; i--) b[int(span)] ^= 1 << int(8)
      return one(b)
    }
    case 'wrongType': {
      const b = Buffer.from(f.bytes)
      b[4] = int(256)
      return one(b)
    }
    case 'truncate': {
      // cut inside a PAGES frame's page data, the bytes written next complete it: the same pages, other bytes
      const cut = int(f.bytes.length)
      const m = one(f.bytes.subarray(0, cut))
      if (f.type === Msg.PAGES && cut >= 17) m.blurred = { region: f.bytes.readUInt32BE(5), first: f.bytes.readUInt32BE(9), count: f.bytes.readUInt32BE(13) }
      return m
    }
    case 'lyingLength': {
      const b = Buffer.from(f.bytes)
      const lies = [0, 1, payload.length, payload.length + 2 + int(64), 0xffffffff, (64 << 20) + 2, Math.max(1, int(payload.length))]
      b.writeUInt32BE(lies[int(lies.length)] >>> 0, 0)
      return one(b)
    }
    case 'outOfRange':
      return one(outOfRange(f, rand, layout))
    case 'msgpackType': {
      if (!CONTROL.has(f.type)) return one(outOfRange(f, rand, layout))
      let body: unknown
      try {
        body = packr.unpack(payload)
      } catch {
        body = {}
      }
      const rec = body && typeof body === 'object' && !Array.isArray(body) ? { ...(body as Record<string, unknown>) } : {}
      const keys = Object.keys(rec)
      if (keys.length === 0 || rand() < 0.2) return one(frame(f.type, packr.pack(otherKind(rec, rand))))
      const k = keys[int(keys.length)]
      rec[k] = otherKind(rec[k], rand)
      return one(frame(f.type, packr.pack(rec)))
    }
    case 'deepNesting': {
      // arrays inside arrays: a recursive decoder must fail cleanly, not overflow the stack of the process
      const depth = f.type === Msg.HELLO || f.type === Msg.AUTH ? 4000 : 20_000 + int(200_000)
      const body = Buffer.alloc(depth + 1, 0x91)
      body[depth] = 0xc0
      return one(frame(CONTROL.has(f.type) ? f.type : Msg.HANDOFF, body))
    }
    case 'crossPhase': {
      const type = CROSS[int(CROSS.length)]
      return one(frame(type, type === Msg.PAGES ? Buffer.alloc(12) : packr.pack({})))
    }
    case 'wrongChannel': {
      // (over TCP a pre-copy page can land on the demand connection: a reply nobody asked for, before the hand-off)
      const others = channels.filter((c) => c !== f.channel)
      return one(f.bytes, others.length === 1 ? others[0] : others[int(others.length)])
    }
    case 'duplicate':
      return { channel: f.channel, writes: [f.bytes, f.bytes], frames: 2 }
    case 'emptyBody':
      return one(frameHeader(f.type, 0))
    case 'garbage': {
      const g = Buffer.alloc(1 + int(200))
      for (let i = 0; i < g.length; i++) g[i] = int(256)
      return one(g)
    }
  }
}

/**
 * A frame with a field outside what the session allows: PAGES, a run list (RANGES, PAGE_REQUEST, WILL_NEED, FREED),
 * HANDOFF, REGIONS, RECOVER_STATE, REGIONS_OK, CLOCK; any other becomes a REQUEST_DONE of an unknown kind.
 */
function outOfRange(f: ScriptFrame, rand: () => number, layout: number[]): Buffer {
  const int = (n: number) => Math.floor(rand() * n)
  const b = Buffer.from(f.bytes)
  const regions = layout.length
  if (f.type === Msg.PAGES && b.length >= 17) {
    const region = b.readUInt32BE(5), pages = layout[region] ?? 0
    const choice = int(5)
    if (choice === 0) b.writeUInt32BE(regions + int(3) + (rand() < 0.3 ? 0xfffffff0 - regions : 0), 5) // no such region
    else if (choice === 1) b.writeUInt32BE(pages + int(8), 9) // first page past the end
    else if (choice === 2) b.writeUInt32BE(0, 13) // no pages
    else if (choice === 3) b.writeUInt32BE(b.readUInt32BE(13) + 1 + int(4), 13) // more pages than the data holds
    else b.writeUInt32BE(0xffffffff, 9) // first + count wraps
    return b
  }
  if (RUN_LISTS.has(f.type) && b.length >= 10) {
    // u8 kind | u32 region | run pairs
    const choice = int(6)
    if (choice === 0) b.writeUInt32BE(regions + int(5), 6)
    else if (choice === 1) b[5] = 2 + int(250) // unknown kind
    else if (choice === 2) return frame(f.type, Buffer.concat([b.subarray(5), Buffer.alloc(1 + int(3))])) // a run cut short
    else if (choice === 3) return frame(f.type, Buffer.concat([b.subarray(5, 10), u32le([0xfffffff0, 0x20])]))
    else if (choice === 4) return frame(f.type, Buffer.concat([b.subarray(5, 10), u32be([(layout[b.readUInt32BE(6)] ?? 1) - 1, 2 + int(1 << 20)])])) // past the region's end
    else return frame(f.type, Buffer.concat([b.subarray(5, 10), u32be([int(4), 0])])) // an empty run
    return b
  }
  if (f.type === Msg.RECOVER_STATE) {
    const body = packr.unpack(b.subarray(5)) as Record<string, unknown>
    const received = (body.received as Uint8Array[] | undefined) ?? []
    const choice = int(4)
    if (choice === 0) body.received = [...received, Buffer.alloc(4)] // one bitmap too many
    else if (choice === 1) body.received = received.slice(1) // one too few
    else if (choice === 2) body.received = received.map((m) => Buffer.alloc(m.length + 4 * (1 + int(4)), 0xff)) // longer than its region
    else body.received = received.map((m) => Buffer.alloc(Math.max(0, m.length - 1))) // not whole words
    return frame(Msg.RECOVER_STATE, packr.pack(body))
  }
  if (f.type === Msg.REGIONS_OK || f.type === Msg.CLOCK) {
    const body = packr.unpack(b.subarray(5)) as Record<string, unknown>
    const lies = [0, -1, 2.5, 2 ** 31, 2 ** 53, -(2 ** 53), 1e300, Number.NaN, Number.POSITIVE_INFINITY]
    // (CLOCK: the destination's answer carries t1, the source's question t0)
    body[f.type === Msg.REGIONS_OK ? 'streams' : 't1' in body ? 't1' : 't0'] = lies[int(lies.length)]
    return frame(f.type, packr.pack(body))
  }
  if (f.type === Msg.HANDOFF) {
    const body = packr.unpack(b.subarray(5)) as Record<string, unknown>
    const choice = int(3)
    if (choice === 0) body.discard = [u32le([layout[0], 1]), ...layout.slice(1).map(() => Buffer.alloc(0))] // past the end
    else if (choice === 1) body.discard = layout.map(() => Buffer.alloc(5)) // not pairs of u32
    else body.discard = [...layout, 1].map(() => Buffer.alloc(0)) // one list too many
    return frame(Msg.HANDOFF, packr.pack(body))
  }
  if (f.type === Msg.REGIONS) {
    const body = packr.unpack(b.subarray(5)) as Record<string, unknown>
    body.regions = (body.regions as { name: string; sizeBytes: number }[]).map((r) => ({ ...r, sizeBytes: r.sizeBytes + 4096 * (1 + int(4)) }))
    return frame(Msg.REGIONS, packr.pack(body))
  }
  return frame(Msg.REQUEST_DONE, packr.pack({ kind: 2 + int(1000) }))
}

function u32be(values: number[]): Buffer {
  const b = Buffer.alloc(values.length * 4)
  values.forEach((v, i) => b.writeUInt32BE(v >>> 0, i * 4))
  return b
}

function u32le(values: number[]): Buffer {
  const b = Buffer.alloc(values.length * 4)
  values.forEach((v, i) => b.writeUInt32LE(v >>> 0, i * 4))
  return b
}

export function frameName(type: number): string {
  return MSG_NAMES[type] ?? `type ${type}`
}
