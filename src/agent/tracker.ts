/**
 * Dirty-page tracking with UFFD_FEATURE_WP_ASYNC + PAGEMAP_SCAN: the kernel
 * resolves write-protect faults itself (no round trip to us) and a scan
 * returns the pages written since the previous scan while re-protecting them
 * atomically. Results are page runs, never one object per page.
 */
import type { NativeBinding, NativeUffd } from '../binding'
import { ErrorCode, UffdMigrateError } from '../errors'

export interface TrackedRegion {
  id: number
  sizeBytes: number
}

export class DirtyTracker {
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
        'dirty tracking needs UFFD_FEATURE_WP_ASYNC, UFFD_FEATURE_WP_UNPOPULATED and PAGEMAP_SCAN (Linux 6.7+); ' +
          'run `npx uffd-migrate doctor`',
        ErrorCode.FEATURE,
      )
    }
    this.uffd = new binding.Uffd(want)
    for (const r of regions) {
      this.uffd.register(r.id, 0, r.sizeBytes, this.k.UFFDIO_REGISTER_MODE_WP)
      this.uffd.writeProtect(r.id, 0, r.sizeBytes, true)
    }
  }

  /** Pages written since the last call (or since tracking began), re-protected atomically. */
  collectWritten(regionId: number, pageCount: number): Uint32Array {
    const W = this.k.PAGE_IS_WRITTEN
    return this.binding.pagemapScan(
      regionId, 0, pageCount, this.k.PM_SCAN_WP_MATCHING | this.k.PM_SCAN_CHECK_WPASYNC, W, 0, 0, W,
    )
  }

  /**
   * Pages written since the last collectWritten(), without re-protecting
   * them: the final scan at the hand-off, after which tracking ends. The
   * read-only walk is ~30x cheaper (4 GiB, 20k written pages: 2.6 ms against
   * 87 ms), and it runs in the pause window.
   */
  peekWritten(regionId: number, pageCount: number): Uint32Array {
    const W = this.k.PAGE_IS_WRITTEN
    return this.binding.pagemapScan(regionId, 0, pageCount, 0, W, 0, 0, W)
  }

  /** Pages that hold real memory: present and not the shared zero page. */
  presentRuns(regionId: number, pageCount: number): Uint32Array {
    // PAGE_IS_SWAPPED is not asked for: with WP_UNPOPULATED the kernel's
    // write-protect markers on never-touched pages report as swapped too.
    const P = this.k.PAGE_IS_PRESENT, Z = this.k.PAGE_IS_PFNZERO
    return this.binding.pagemapScan(regionId, 0, pageCount, 0, P | Z, Z, 0, P)
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
