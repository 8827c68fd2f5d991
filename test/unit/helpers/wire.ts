/**
 * A whole migration in memory, for the pure tier: two fake hosts (one
 * FakeBinding each), a source and a destination engine wired by in-memory
 * transports, a "service" that writes pages on the source while rounds run
 * and reads them on the destination after the hand-off. No addon, no socket,
 * no kernel.
 */
import type { Headroom } from '../../../src/memory-headroom'
import { PageBitmap } from '../../../src/bitmap'
import { nowMs } from '../../../src/stats'
import { MigrationDestination } from '../../../src/agent/destination/index'
import { MigrationSource, type Progress, type SourceOptions } from '../../../src/agent/source/index'
import type { MigrationMode, MigrationReport } from '../../../src/agent/report'
import { Region } from '../../../src/region'
import { FakeBinding } from '../../../src/testing/fake-binding'
import { MemoryTransport } from '../../../src/testing/memory-transport'

export const PS = 4096
export const TOKEN = Buffer.from('unit-test-token-0123456789')

import { prng } from '../../../src/testing/prng'

export { prng }

export interface Pair {
  src: FakeBinding
  dst: FakeBinding
  srcRegions: Region[]
  dstRegions: Region[]
  dest: MigrationDestination
  received: PageBitmap[]
  /** Every transport opened so far (source end), newest last. */
  links: MemoryTransport[]
  restored: Promise<Uint8Array>
  settled: Promise<void>
  destFailed: Promise<Error>
  events: string[]
  resumedOnSource: number
  /** Make the next restore() reject (the service cannot decode its state). */
  failRestore: boolean
  /** The destination's restore waits for this (a service slow to start). */
  restoreGate?: Promise<void>
  /** Set to refuse dials (a destination that is gone). */
  refuseDials: boolean
  progress: Progress[]
  /**
   * Sees the type of every frame as one side starts writing it; 'cut'
   * breaks that link before the frame leaves (a reset: in-flight bytes are lost);
   * 'drop' loses that frame alone (a peer that stops reading after it).
   */
  onFrame?: (from: 'source' | 'destination', type: number, on: MemoryTransport) => 'cut' | 'drop' | undefined
  /** Each session the destination ended before its hand-off (sessionEnded): its id, and whether it was a preflight. */
  endedSessions: { id: string | undefined; preflight: boolean }[]
  /** What the destination can still allocate, as src/memory-headroom.ts would find it (undefined: no check). */
  headroom?: Headroom
}

/** Calls onType with each frame's type as a writer starts it (frame headers are written in one piece). */
function watchFrames(t: MemoryTransport, onType: (type: number) => 'cut' | 'drop' | undefined): void {
  const write = t.write.bind(t)
  let left = 0, dropping = false
  t.write = (chunk: Buffer) => {
    if (left === 0 && chunk.length >= 5) {
      left = chunk.readUInt32BE(0) + 4
      const what = onType(chunk[4])
      if (what === 'cut') {
        t.cut()
        return false
      }
      dropping = what === 'drop' // (the frame never arrives; the connection lives: a peer that stopped reading it)
    }
    left -= chunk.length
    return dropping ? true : write(chunk)
  }
}

/** The link is cut (a reset) as the first frame of this type leaves `from`; `cut` says whether that happened. */
export function cutOnFirst(pair: Pair, from: 'source' | 'destination', type: number): { readonly cut: boolean } {
  const state = { cut: false }
  pair.onFrame = (f, t) => {
    if (state.cut || f !== from || t !== type) return undefined
    state.cut = true
    return 'cut'
  }
  return state
}

/** Two hosts with the same region table; `fill` writes the source's initial content. */
export function makePair(pageCounts: number[], fill: (src: FakeBinding, regions: Region[]) => void, destOptions: { encrypt?: boolean } = {}): Pair {
  const src = new FakeBinding(PS), dst = new FakeBinding(PS)
  const srcRegions = pageCounts.map((n, i) => Region.create(`r${i}`, n * PS, src))
  const dstRegions = pageCounts.map((n, i) => Region.create(`r${i}`, n * PS, dst))
  fill(src, srcRegions)
  const received = dstRegions.map((r) => new PageBitmap(r.pageCount))
  let restoredResolve!: (s: Uint8Array) => void, settledResolve!: () => void, failedResolve!: (e: Error) => void
  const pair = {
    src, dst, srcRegions, dstRegions, received, links: [] as MemoryTransport[], events: [] as string[], endedSessions: [], resumedOnSource: 0,
    failRestore: false, refuseDials: false, progress: [] as Progress[],
    restored: new Promise<Uint8Array>((r) => (restoredResolve = r)),
    settled: new Promise<void>((r) => (settledResolve = r)),
    destFailed: new Promise<Error>((r) => (failedResolve = r)),
  } as unknown as Pair // (dest: set below)
  pair.dest = new MigrationDestination(dst, dstRegions, received, { token: TOKEN, bulkBufferBytes: 0, memoryHeadroom: () => pair.headroom, ...destOptions }, {
    restore: async (state) => {
      pair.events.push('restore')
      if (pair.failRestore) throw new Error('cannot decode')
      await pair.restoreGate
      restoredResolve(state)
      return nowMs()
    },
    settled: () => {
      pair.events.push('settled')
      settledResolve()
    },
    ready: () => {},
    failed: (err) => {
      pair.events.push(`failed:${(err as { code?: string }).code}`)
      failedResolve(err)
    },
    recovering: () => pair.events.push('recovering'),
    sessionEnded: (err, session) => {
      pair.events.push(`ended:${(err as { code?: string }).code}:${err.message}`)
      pair.endedSessions.push(session)
    },
    preflight: (o) => pair.events.push(`preflight:${o.session}`),
  })
  return pair
}

export function sourceOptions(pair: Pair, mode: MigrationMode, extra: Partial<SourceOptions> = {}): SourceOptions {
  return {
    to: 'memory:1',
    mode,
    token: TOKEN,
    downtimeMs: 50,
    maxRounds: 5,
    connectTimeoutMs: 1000,
    recoveryTimeoutMs: 2000,
    linkTimeoutMs: 0,
    prepaging: { strategy: 'bubble' },
    pushLog: false,
    bulkBufferBytes: 0,
    postcopyNice: 0,
    dial: async () => {
      if (pair.refuseDials) throw Object.assign(new Error('refused'), { code: 'ERR_MIGRATION_CONNECT' })
      const [a, b] = MemoryTransport.pair(256 * 1024)
      pair.links.push(a)
      watchFrames(a, (type) => pair.onFrame?.('source', type, a))
      watchFrames(b, (type) => pair.onFrame?.('destination', type, b))
      void pair.dest.accept(b)
      return a
    },
    ...extra,
  }
}

export interface RunOptions {
  mode: MigrationMode
  /** Called while rounds run (the service keeps writing); return false to stop. */
  writer?: (src: FakeBinding, regions: Region[]) => void
  state?: Uint8Array
  extra?: Partial<SourceOptions>
  freed?: () => number[]
  /** The service's pause fails with this (the engine gets it coded, as from src/guest.ts). */
  pauseFails?: Error
}

export function startSource(pair: Pair, o: RunOptions): { source: MigrationSource; report: Promise<MigrationReport> } {
  let writing = !!o.writer
  const tick = () => {
    if (!writing) return
    o.writer!(pair.src, pair.srcRegions)
    setImmediate(tick)
  }
  if (writing) setImmediate(tick)
  const source = new MigrationSource(pair.src, pair.srcRegions, sourceOptions(pair, o.mode, o.extra), {
    pause: async () => {
      writing = false
      if (o.pauseFails) throw o.pauseFails
      return { state: o.state ?? new Uint8Array([1, 2, 3]) }
    },
    resume: () => {
      pair.resumedOnSource++
    },
    progress: (p) => pair.progress.push(p),
    // called at the start of every round and at the hand-off: the service's
    // writes land between rounds whatever the timing of this loop
    takeFreed: () => {
      if (writing) o.writer!(pair.src, pair.srcRegions)
      return o.freed?.() ?? []
    },
  })
  const report = source.run()
  report.catch(() => {})
  report.finally(() => (writing = false)).catch(() => {})
  return { source, report }
}

/** The destination's service reads every page (faulting the missing ones); then both hosts must hold the same bytes. */
export async function touchAll(pair: Pair, order: 'forward' | 'random' = 'forward', seed = 1): Promise<void> {
  const rand = prng(seed)
  for (const r of pair.dstRegions) {
    const pages = [...Array(r.pageCount).keys()]
    if (order === 'random') pages.sort(() => rand() - 0.5)
    await Promise.all(pages.map((p) => pair.dst.touch(r.id, p)))
  }
}

export function sameBytes(pair: Pair): string | undefined {
  for (let i = 0; i < pair.srcRegions.length; i++) {
    const a = new Uint8Array(pair.srcRegions[i].buffer), b = new Uint8Array(pair.dstRegions[i].buffer)
    for (let p = 0; p < a.length; p += PS) {
      if (Buffer.compare(a.subarray(p, p + PS), b.subarray(p, p + PS)) !== 0) return `region ${i} page ${p / PS} differs`
    }
  }
  return undefined
}

/** A page whose bytes say which page and which version it is. */
export function pageBytes(region: number, page: number, version: number): Uint8Array {
  const b = new Uint8Array(PS)
  const v = new DataView(b.buffer)
  for (let o = 0; o < PS; o += 16) {
    v.setUint32(o, region)
    v.setUint32(o + 4, page)
    v.setUint32(o + 8, version)
    v.setUint32(o + 12, 0xfeed)
  }
  return b
}
