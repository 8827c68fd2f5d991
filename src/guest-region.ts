/**
 * One region of a guest as the service sees it: its memory, and on a
 * destination in post-copy the cooperative calls (isLocal, ready, willNeed)
 * and free-page reports, which go to the agent through the guest.
 */
import type { MainToAgent } from './agent/messages'
import type { PageBitmap } from './bitmap'
import { ErrorCode, UffdMigrateError } from './errors'
import type { Region } from './region'

/** What a region needs of its guest (Guest has it). */
export interface RegionHost {
  /** Every page is local (always on a source). */
  readonly isSettledFlag: boolean
  waitLocal(region: number, first: number, count: number): Promise<void>
  post(m: MainToAgent): void
}

export class GuestRegion {
  constructor(
    private readonly guest: RegionHost,
    /** Index in the region table. */
    readonly index: number,
    readonly region: Region,
    private readonly receivedMap: PageBitmap | undefined,
  ) {}

  get name(): string {
    return this.region.name
  }
  get buffer(): ArrayBuffer {
    return this.region.buffer
  }
  get sizeBytes(): number {
    return this.region.sizeBytes
  }
  /** Pages of this region not on this host yet (a destination's, before it settled; `status`). */
  get pagesLeft(): number {
    return this.receivedMap && !this.guest.isSettledFlag ? this.region.pageCount - this.receivedMap.count() : 0
  }

  private pages(offset: number, length: number): [number, number] {
    const ps = this.region.pageSize
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length <= 0 || offset + length > this.region.sizeBytes) {
      throw new UffdMigrateError(
        `expected a range inside region '${this.name}' (0..${this.region.sizeBytes}), got offset ${offset} length ${length}`,
        ErrorCode.INVALID_ARG,
      )
    }
    const first = Math.floor(offset / ps)
    return [first, Math.ceil((offset + length) / ps) - first]
  }

  /** True when every page of the range is on this host (reads the received bitmap). */
  isLocal(offset: number, length: number): boolean {
    const [first, count] = this.pages(offset, length)
    return !this.receivedMap || this.guest.isSettledFlag || this.receivedMap.allSet(first, count)
  }

  /** Resolves when the range is local; asks for it at once, with urgent priority. */
  ready(offset: number, length: number): Promise<void> {
    const [first, count] = this.pages(offset, length)
    if (!this.receivedMap || this.guest.isSettledFlag || this.receivedMap.allSet(first, count)) return Promise.resolve()
    return this.guest.waitLocal(this.index, first, count)
  }

  /** Non-blocking hint: these pages go to the front of the push. */
  willNeed(offset: number, length: number): void {
    const [first, count] = this.pages(offset, length)
    if (!this.receivedMap || this.guest.isSettledFlag || this.receivedMap.allSet(first, count)) return
    this.guest.post({ type: 'willNeed', region: this.index, firstPage: first, pageCount: count })
  }

  /**
   * The service no longer uses the whole pages of this range: they read as
   * zero from now on and never cross the network (ballooning).
   */
  free(offset: number, length: number): void {
    const ps = this.region.pageSize
    this.pages(offset, length)
    // only whole pages inside the range
    const first = Math.ceil(offset / ps)
    const end = Math.floor((offset + length) / ps)
    if (end <= first) return
    // a destination in post-copy zero-fills the range here and now through the agent's userfaultfd, so that a touch
    // right after (an allocator reusing the range) neither faults over the network nor reads the old bytes. -1: no
    // userfaultfd holds the region (not receiving, or settled): a plain discard reads zero. -errno: the range is
    // dropped, not filled: the agent fills what is missing. Either way the agent marks the pages (a destination's
    // tells the source not to push them)
    const filled = this.receivedMap && !this.guest.isSettledFlag ? this.region.discardRegistered(first * ps, (end - first) * ps) : -1
    if (filled === -1) this.region.discard(first * ps, (end - first) * ps)
    this.guest.post({ type: 'free', region: this.index, firstPage: first, pageCount: end - first, filled: filled !== undefined && filled >= 0 })
  }
}


/** One of this guest's regions, by name or object (ERR_INVALID_ARG for any other). */
export function regionOf(regions: Record<string, GuestRegion>, region: string | GuestRegion): GuestRegion {
  const r = typeof region === 'string' ? regions[region] : region
  if (r && regions[r.name] === r) return r
  const name = typeof region === 'string' ? region : (region as GuestRegion | undefined)?.name
  throw new UffdMigrateError(`expected a region of this guest (${Object.keys(regions).map((n) => `'${n}'`).join(', ')}), got ${JSON.stringify(name)}`, ErrorCode.INVALID_ARG)
}
