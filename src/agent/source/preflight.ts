/**
 * A preflight (`send --dry-run`, guest.preflight()): what a migration does before its first page, and nothing after.
 * This host's tracker is chosen; the connections open and authenticate (the protocol version checked, a busy
 * destination retried as a migration would); the destination checks the region table and whether it can hold the
 * guest, and answers PREFLIGHT_OK with what it found. The session ends there: no page moves, the service never pauses,
 * and the destination listens for the next source. A failure is the error the migration would have met, with its code.
 */
import type { NativeBinding } from '../../binding'
import { decodeControl, Msg } from '../../protocol/messages'
import type { Region } from '../../region'
import { systemClock } from '../clock'
import { trackerFor } from '../tracker'
import type { TrackerChoice } from '../tracker-choice'
import { nativeWriterAvailable } from './bulk-writer'
import type { SourceOptions } from './hooks'
import { reply, SourceLink } from './link'
import { regionsMessage, residentBytes } from './region-table'

export interface PreflightReport {
  to: string
  /** The id the migration would have had (the destination logs it with its preflight line). */
  migration: string
  mode: SourceOptions['mode']
  /** The connections opened and authenticated (urgent, bulk, and demand where both sides run the native path), ms. */
  connectMs: number
  /** Until PREFLIGHT_OK arrived (the destination's checks included), ms. */
  totalMs: number
  regions: { name: string; sizeBytes: number }[]
  /** What the regions hold here (undefined: a kernel without PAGEMAP_SCAN, where the destination does not check). */
  residentBytes?: number
  /** The dirty-page tracker a migration from here gets, and why. */
  tracker: TrackerChoice
  /** The connections would be sealed (this side or the destination asked). */
  encrypted: boolean
  destination: {
    /** What it can still allocate, and what limits it (absent: its memory check is off). */
    headroomBytes?: number
    limitedBy?: string
    /** Bulk connections it would grant (1: bulk alone). */
    streams: number
  }
}

export async function preflight(binding: NativeBinding, regions: Region[], opts: SourceOptions & { session: string }): Promise<PreflightReport> {
  const clock = opts.clock ?? systemClock, t0 = clock.now()
  const tracker = trackerFor(binding, opts.tracker) // a host that cannot track writes fails here, as migrate() would
  const link = await SourceLink.open(binding, opts, opts.session)
  const connectMs = clock.now() - t0
  try {
    const resident = residentBytes(binding, regions)
    link.bulk.send(regionsMessage(binding, regions, opts, { nativeWriter: nativeWriterAvailable(binding) && !link.encrypted, resident, preflight: true }))
    const m = decodeControl(Msg.PREFLIGHT_OK, (await reply(link.bulk, Msg.PREFLIGHT_OK, opts.linkTimeoutMs, clock)).payload)
    return {
      to: opts.to, migration: opts.session, mode: opts.mode, connectMs, totalMs: clock.now() - t0,
      regions: regions.map((r) => ({ name: r.name, sizeBytes: r.sizeBytes })),
      ...(resident !== undefined ? { residentBytes: resident } : {}),
      tracker,
      encrypted: link.encrypted,
      destination: {
        ...(typeof m.headroomBytes === 'number' ? { headroomBytes: m.headroomBytes } : {}),
        ...(typeof m.limitedBy === 'string' ? { limitedBy: m.limitedBy } : {}),
        streams: typeof m.streams === 'number' ? m.streams : 1,
      },
    }
  } finally {
    link.close()
  }
}
