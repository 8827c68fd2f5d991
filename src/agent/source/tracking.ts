/**
 * One migration's dirty-page tracking, from round 0 to the hand-off: which tracker this host gets, what goes in
 * the report, and when tracking ends. Before the hand-off it ends at once: the service runs on here, and a next
 * migration may track it again. After it, the tracker is kept until the agent exits: ending write-protection walks
 * every page table with the mmap lock held (0.8 s at 4 GiB), which stalls every thread of the process that faults
 * meanwhile, the forwarder's included (a traced precopy run: the source's main thread stalled 164 ms, clients
 * waited 227 ms instead of 47-66). The service no longer runs here; the process is on its way out, and its exit
 * pays for it.
 */
import type { NativeBinding } from '../../binding'
import type { MigrationReport } from '../report'
import { type DirtyTracker, openTracker, type TrackedRegion, type TrackerOption, trackerFor } from '../tracker'
import type { TrackerChoice } from '../tracker-choice'

export class Tracking {
  private current: DirtyTracker | undefined
  /** After a committed hand-off: a reference, so that no finalizer closes it at a random moment. */
  private retired: DirtyTracker | undefined
  private choice: TrackerChoice | undefined

  /** The tracker this kernel (or the option) gives, tracking every region from now on. */
  open(binding: NativeBinding, regions: TrackedRegion[], option: TrackerOption | undefined): DirtyTracker {
    this.choice = trackerFor(binding, option)
    this.current = openTracker(binding, regions, this.choice.kind)
    return this.current
  }

  get kind(): TrackerChoice['kind'] | undefined {
    return this.choice?.kind
  }

  /** The tracker's own threads' CPU time, ms (sync-wp's fault thread). */
  get cpuMs(): number {
    return this.current?.cpuMs ?? 0
  }

  /** The report's part: the choice, and (sync-wp) what its fault thread did. */
  report(): MigrationReport['tracker'] {
    const t = this.current ?? this.retired
    return this.choice && { ...this.choice, faults: t?.faults, starved: t?.starved }
  }

  /** Tracking ends: at once before the hand-off (committed false, also a hand-off that never arrived), at the agent's exit after it. */
  close(committed: boolean): void {
    const t = this.current
    this.current = undefined
    if (!t) return
    if (committed) this.retired = t
    else t.close()
  }
}
