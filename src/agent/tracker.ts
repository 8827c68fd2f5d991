/**
 * Dirty-page tracking behind one interface; the pre-copy rounds do not know
 * which tracker runs (see tracker-choice.ts for which host gets which).
 * Results are page runs [first, count]*, never one object per page.
 */
import { availableParallelism } from 'node:os'
import type { NativeBinding, NativeSyncWpTracker, NativeUffd } from '../binding'
import { ErrorCode, UffdMigrateError } from '../errors'
import { chooseTracker, resolveTrackerSetting, syncWpSettings, type TrackerChoice, type TrackerKind, type TrackerSetting } from './tracker-choice'

/** Threads of the hand-off's final scan (peekWritten): the CPUs this process may use, at most 4. */
const FINAL_SCAN_THREADS = Math.max(1, Math.min(4, availableParallelism()))

export interface TrackedRegion {
  id: number
  sizeBytes: number
}

export interface DirtyTracker {
  readonly kind: TrackerKind
  /** Pages written since the last call (or since tracking began), re-protected atomically. */
  collectWritten(regionId: number, pageCount: number): Uint32Array
  /** Pages written since the last collectWritten(), left as they are: the hand-off's final scan (the service is paused). */
  peekWritten(regionId: number, pageCount: number): Uint32Array
  /** Pages that hold memory (what round 0 sends; the rest are zero ranges). */
  presentRuns(regionId: number, pageCount: number): Uint32Array
  /** Write faults this tracker resolved itself (sync-wp), for the report. */
  readonly faults?: number
  /** Times its fault thread was starved in the idle class and put back in the normal class (sync-wp), for the report. */
  readonly starved?: number
  /** CPU time of the tracker's own thread (sync-wp), ms. */
  readonly cpuMs?: number
  close(): void
}

/** A guest's tracker setting and who set it (for the error that names it). */
export interface TrackerOption {
  setting: TrackerSetting
  forcedBy: string
}

/** The tracker this kernel gives a migration with this setting. */
export function trackerFor(binding: NativeBinding, opt: TrackerOption = { setting: 'auto', forcedBy: 'the tracker option' }): TrackerChoice {
  const probe = binding.probe()
  return chooseTracker(
    { features: probe.features, constants: binding.constants, pagemapScan: probe.pagemapScan, syncWpBuilt: binding.SyncWpTracker !== undefined },
    opt.setting, opt.forcedBy,
  )
}

/** 'kind: reason' of the tracker a migration with this option would get, or 'none: why' (`status`). */
export function describeTracker(binding: NativeBinding, option?: string): string {
  try {
    const c = trackerFor(binding, resolveTrackerSetting(option))
    return `${c.kind}: ${c.reason}`
  } catch (err) {
    return `none: ${(err as Error).message}`
  }
}

/** Runs of pages present and not the shared zero page: one read-only PAGEMAP_SCAN walk (Linux 6.7+; throws before). */
export function presentRuns(binding: NativeBinding, regionId: number, pageCount: number): Uint32Array {
  // PAGE_IS_SWAPPED is not asked for: with WP_UNPOPULATED the kernel's
  // write-protect markers on never-touched pages report as swapped too.
  const P = binding.constants.PAGE_IS_PRESENT, Z = binding.constants.PAGE_IS_PFNZERO
  return binding.pagemapScan(regionId, 0, pageCount, 0, P | Z, Z, 0, P)
}

export function openTracker(binding: NativeBinding, regions: TrackedRegion[], kind: TrackerKind): DirtyTracker {
  return kind === 'sync-wp' ? new SyncWpTracker(binding, regions) : new AsyncWpTracker(binding, regions)
}

/**
 * UFFD_FEATURE_WP_ASYNC + PAGEMAP_SCAN (Linux 6.7+): the kernel resolves
 * write-protect faults itself (no round trip to us) and a scan returns the
 * pages written since the previous scan while re-protecting them atomically.
 */
export class AsyncWpTracker implements DirtyTracker {
  readonly kind = 'wp-async'
  private readonly uffd: NativeUffd
  private readonly k: Record<string, number>

  constructor(
    private readonly binding: NativeBinding,
    private readonly regions: TrackedRegion[],
  ) {
    this.k = binding.constants
    const want = this.k.UFFD_FEATURE_WP_ASYNC | this.k.UFFD_FEATURE_WP_UNPOPULATED
    const probe = binding.probe()
    if ((probe.features & want) !== want || probe.pagemapScan !== 0) {
      throw new UffdMigrateError(
        'the wp-async tracker needs UFFD_FEATURE_WP_ASYNC, UFFD_FEATURE_WP_UNPOPULATED and PAGEMAP_SCAN (Linux 6.7+); ' +
          'run `npx uffd-migrate doctor`',
        ErrorCode.FEATURE,
      )
    }
    this.uffd = new binding.Uffd(want)
    for (const r of regions) {
      this.uffd.register(r.id, 0, r.sizeBytes, this.k.UFFDIO_REGISTER_MODE_WP)
      this.protectAll(r)
    }
  }

  /**
   * Every page of the region write-protected, present or not (WP_UNPOPULATED puts markers in the holes):
   * PAGEMAP_SCAN with WP_MATCHING, a filter that matches every page and no output (the kernel's exclusive
   * write-protect path). The same result as UFFDIO_WRITEPROTECT over the range in a third of the time on
   * populated memory (bench/c/protect_all.c, run by bench:bulk; 1 GiB on the development VM: 9.9-10.3 ms against
   * 22.8-30.2, a scan that returns runs 14.2-14.7; 1 MiB in 10 written: 6.1-7.2 against 8.3-9.1), before round 0
   * and while the service runs on.
   */
  private protectAll(r: TrackedRegion): void {
    this.binding.pagemapProtectAll(r.id, 0, Math.ceil(r.sizeBytes / this.binding.pageSize))
  }

  collectWritten(regionId: number, pageCount: number): Uint32Array {
    const W = this.k.PAGE_IS_WRITTEN
    return this.binding.pagemapScan(
      regionId, 0, pageCount, this.k.PM_SCAN_WP_MATCHING | this.k.PM_SCAN_CHECK_WPASYNC, W, 0, 0, W,
    )
  }

  /**
   * The read-only walk is ~30x cheaper than a re-protecting one (4 GiB, 20k written pages: 2.6 ms against 87 ms), and it
   * runs in the pause window: the one part of it that grows with memory. The service is paused, so the walk is split
   * over the CPUs (each thread gets 512 MiB or more; C, 4 GiB on 2 vCPUs: 1.4-2.0 ms on one thread, 0.8-0.9 on two).
   */
  peekWritten(regionId: number, pageCount: number): Uint32Array {
    const W = this.k.PAGE_IS_WRITTEN
    return this.binding.pagemapScan(regionId, 0, pageCount, 0, W, 0, 0, W, FINAL_SCAN_THREADS)
  }

  presentRuns(regionId: number, pageCount: number): Uint32Array {
    return presentRuns(this.binding, regionId, pageCount)
  }

  close(): void {
    for (const r of this.regions) {
      try {
        this.uffd.unregister(r.id, 0, r.sizeBytes)
      } catch {
        // region already released: nothing left to unregister
      }
    }
    this.uffd.close()
  }
}

/**
 * Synchronous write-protect (Linux 5.7+), for kernels without WP_ASYNC: a
 * native thread (native/wp_tracker.cc) resolves each first write of a round
 * by recording the page and un-protecting it; collectWritten() takes that
 * record and re-protects exactly those pages. The thread lives as long as
 * the tracker: a write to a protected page waits for it.
 */
export class SyncWpTracker implements DirtyTracker {
  readonly kind = 'sync-wp'
  private readonly native: NativeSyncWpTracker

  constructor(binding: NativeBinding, regions: TrackedRegion[]) {
    if (!binding.SyncWpTracker) throw new UffdMigrateError('this addon has no sync-WP tracker', ErrorCode.FEATURE)
    const { followWriter, idleClass } = syncWpSettings()
    this.native = new binding.SyncWpTracker(regions.map((r) => r.id), followWriter, idleClass)
  }

  get cpuMs(): number {
    return this.native.stats.cpuMs
  }

  /** Times the thread moved to the CPU of the thread that faulted (a writer the scheduler moved: see native/wp_tracker.cc). */
  get cpuMoves(): number {
    return this.native.stats.cpuMoves
  }

  /** Times other work on its CPU starved the idle-class fault thread, and its guard moved it back to the normal class. */
  get starved(): number {
    return this.native.stats.starved
  }

  /** Collects whose re-protect ran off the writer's CPU (see native/wp_tracker.cc). */
  get collectsMoved(): number {
    return this.native.stats.collectsMoved
  }

  get faults(): number {
    const s = this.native.stats
    return s.wpFaults + s.missingFaults
  }

  collectWritten(regionId: number): Uint32Array {
    return this.native.collect(regionId)
  }

  peekWritten(regionId: number): Uint32Array {
    return this.native.peek(regionId)
  }

  /** Present or swapped, from /proc/self/pagemap (zero pages mapped here count as present: the sender finds them zero). */
  presentRuns(regionId: number): Uint32Array {
    return this.native.present(regionId)
  }

  close(): void {
    this.native.close()
  }
}
