/**
 * REGIONS, the first message of a session (the destination's region-table.ts checks it): the region table, the
 * source's timeouts and mode, the bulk streams it asks for, and what its regions hold (residentBytes: the destination
 * refuses a guest it cannot hold before any page moves, src/memory-headroom.ts).
 */
import type { NativeBinding } from '../../binding'
import { encodeControl, Msg } from '../../protocol/messages'
import type { Region } from '../../region'
import { presentRuns } from '../tracker'
import type { SourceOptions } from './hooks'

/** nativeWriter: this side would write bulk natively (only then are streams asked for); resident: residentBytes(). */
export function regionsMessage(binding: NativeBinding, regions: Region[], opts: SourceOptions, x: { nativeWriter: boolean; resident: number | undefined; preflight?: boolean }): Buffer[] {
  const { nativeWriter, resident, preflight } = x
  return encodeControl(Msg.REGIONS, {
    linkTimeoutMs: opts.linkTimeoutMs,
    ...(opts.requestTimeoutMs !== undefined ? { requestTimeoutMs: opts.requestTimeoutMs } : {}),
    pageSize: binding.pageSize,
    regions: regions.map((r) => ({ name: r.name, sizeBytes: r.sizeBytes })),
    ...(opts.streams! > 1 && nativeWriter ? { streams: opts.streams } : {}),
    ...(opts.servesHttp ? { servesHttp: true } : {}),
    mode: opts.mode,
    ...(resident !== undefined ? { residentBytes: resident } : {}),
    ...(preflight ? { preflight: true } : {}),
  })
}

/**
 * Bytes of the regions that hold memory, the most the destination must allocate for them (a page that holds only
 * zeroes there is still counted: the walk does not read pages). One read-only walk of the page tables before round 0
 * (outside the pause window); its cost grows with the runs it returns: the page-store's layout, 7 pages in 8 written,
 * took 0.8 ms at 256 MiB and 12 ms at 4 GiB on the 2-vCPU VM (medians of 7). Undefined on a kernel without
 * PAGEMAP_SCAN (before 6.7: the destination does not check).
 */
export function residentBytes(binding: NativeBinding, regions: Region[]): number | undefined {
  let pages = 0
  try {
    for (const r of regions) {
      const runs = presentRuns(binding, r.id, r.pageCount)
      for (let k = 1; k < runs.length; k += 2) pages += runs[k]
    }
  } catch {
    return undefined
  }
  return pages * binding.pageSize
}
