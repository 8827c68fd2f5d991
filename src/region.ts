/**
 * A guest memory region: anonymous private memory exposed as an ArrayBuffer.
 * The same region can be opened in another thread (the agent's worker) by id;
 * the memory is unmapped when the last view in any thread lets go.
 */
import { loadBinding, type NativeBinding } from './binding'
import { ErrorCode, UffdMigrateError } from './errors'

export interface RegionDescriptor {
  name: string
  id: number
  sizeBytes: number
}

export class Region {
  readonly pageSize: number
  readonly pageCount: number
  private view: ArrayBuffer | undefined

  protected constructor(
    readonly name: string,
    readonly id: number,
    readonly sizeBytes: number,
    buffer: ArrayBuffer,
    protected readonly binding: NativeBinding,
  ) {
    this.view = buffer
    this.pageSize = binding.pageSize
    this.pageCount = sizeBytes / binding.pageSize
  }

  /** Maps `bytes` (rounded up to whole pages) of fresh zeroed memory. */
  static create(name: string, bytes: number, binding = loadBinding()): Region {
    const size = roundUpToPage(bytes, binding.pageSize)
    const { id, buffer } = binding.regionCreate(size)
    return new Region(name, id, size, buffer, binding)
  }

  /** Opens, in this thread, a region created in another thread of this process. */
  static open(desc: RegionDescriptor, binding = loadBinding()): Region {
    const buffer = binding.regionOpen(desc.id)
    return new Region(desc.name, desc.id, desc.sizeBytes, buffer, binding)
  }

  get buffer(): ArrayBuffer {
    if (!this.view) throw new UffdMigrateError(`region '${this.name}' was released`, ErrorCode.RELEASED)
    return this.view
  }

  get released(): boolean {
    return this.view === undefined
  }

  describe(): RegionDescriptor {
    return { name: this.name, id: this.id, sizeBytes: this.sizeBytes }
  }

  /** Drops this thread's view; the memory goes once no thread holds one. */
  release(): void {
    if (!this.view) return
    this.binding.regionRelease(this.view)
    this.view = undefined
  }

  /** discard() of many (firstPage, pageCount) runs in as few system calls as the kernel allows. */
  discardRuns(runs: Uint32Array): number {
    return runs.length ? this.binding.discardRuns(this.id, runs) : 0
  }

  /**
   * discard() and zero pages placed through the userfaultfd that holds this region (a destination's before it
   * settles): the range reads zero and never faults. The pages filled; -1 when no userfaultfd holds it; -errno when a
   * call failed (the range is dropped, missing pages fault as after discard()); undefined without the native call (the fake binding).
   */
  discardRegistered(offset: number, length: number): number | undefined {
    return this.binding.discardRegistered?.(this.id, offset, length)
  }

  /** madvise(MADV_DONTNEED): the range reads as zeros (or faults, when registered MISSING). */
  discard(offset: number, length: number): void {
    this.binding.discard(this.id, offset, length)
  }
}

export function roundUpToPage(bytes: number, pageSize: number): number {
  if (!Number.isSafeInteger(bytes) || bytes <= 0) {
    throw new UffdMigrateError(`expected a region size in bytes > 0, got ${bytes}`, ErrorCode.INVALID_ARG)
  }
  return Math.ceil(bytes / pageSize) * pageSize
}
