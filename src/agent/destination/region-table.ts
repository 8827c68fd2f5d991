/**
 * REGIONS, the first message of a session: the source's region table must
 * equal the destination's, and it carries the source's timeouts (bounded
 * here: a peer cannot switch the stuck-peer rules off or make them absurd).
 */
import { ErrorCode, migrationError } from '../../errors'
import type { Frame } from '../../protocol/frames'
import { decodeControl, field, uint } from '../../protocol/messages'
import type { Region } from '../../region'
import { DEFAULT_REQUEST_TIMEOUT_MS, type StuckLimits } from './watchdog'

/**
 * The table's limits, and the bulk streams the source asks for (bulk included; 1 when absent). precopyOnly: the
 * source's mode is pre-copy (every page arrives before the hand-off); absent or another mode: false. residentBytes:
 * what the source holds in its regions (undefined: it could not count them cheaply, a kernel without PAGEMAP_SCAN).
 * preflight: the source only asks whether a migration would start (send --dry-run).
 */
export function acceptRegionTable(f: Frame, regions: Region[], pageSizeHere: number): StuckLimits & { streams: unknown; servesHttp: boolean; precopyOnly: boolean; residentBytes: number | undefined; preflight: boolean } {
  const m = decodeControl(f.type, f.payload)
  const pageSize = uint(m, 'pageSize', 'REGIONS', 1 << 30)
  const list = field<unknown[]>(m, 'regions', 'array', 'REGIONS')
  const theirs = list.map((r, i) => {
    if (typeof r !== 'object' || r === null) throw migrationError(ErrorCode.PROTOCOL, `expected REGIONS.regions[${i}] to be a map`)
    const rec = r as Record<string, unknown>
    return { name: field<string>(rec, 'name', 'string', `REGIONS.regions[${i}]`), sizeBytes: uint(rec, 'sizeBytes', `REGIONS.regions[${i}]`) }
  })
  const ours = regions.map((r) => ({ name: r.name, sizeBytes: r.sizeBytes }))
  const fmt = (t: { name: string; sizeBytes: number }[]) => t.map((r) => `${r.name}=${r.sizeBytes}`).join(', ')
  if (pageSize !== pageSizeHere || JSON.stringify(theirs) !== JSON.stringify(ours)) {
    throw migrationError(
      ErrorCode.REGIONS,
      `region table mismatch: the source has {${fmt(theirs)}} (page size ${pageSize}), the destination asked for {${fmt(ours)}} (page size ${pageSizeHere}); start the same service with the same region sizes on both hosts`,
    )
  }
  const ms = (v: unknown, min: number, fallback: number) => (typeof v === 'number' && v >= min ? Math.min(v, 3600_000) : fallback)
  return { linkTimeoutMs: ms(m.linkTimeoutMs, 1000, 0), requestTimeoutMs: ms(m.requestTimeoutMs, 100, DEFAULT_REQUEST_TIMEOUT_MS), streams: m.streams, servesHttp: m.servesHttp === true, precopyOnly: m.mode === 'precopy',
    residentBytes: m.residentBytes === undefined ? undefined : Math.min(uint(m, 'residentBytes', 'REGIONS'), ours.reduce((n, r) => n + r.sizeBytes, 0)),
    preflight: m.preflight === true }
}

/** REGIONS of a preflight (send --dry-run), whatever else it holds (false for one that does not decode). */
export function isPreflight(f: Frame): boolean {
  try {
    return decodeControl(f.type, f.payload).preflight === true
  } catch {
    return false
  }
}
