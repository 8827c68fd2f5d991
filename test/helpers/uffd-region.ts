import { randomBytes } from 'node:crypto'
import type { NativeBinding, NativeUffd } from '../../src/binding'
import { Region } from '../../src/region'

/** A region of `pages` pages registered for missing-page faults with a uffd of its own (the native tests'). */
export function missingRegion(b: NativeBinding, pages: number): { region: Region; uffd: NativeUffd } {
  const region = Region.create('t', pages * b.pageSize)
  const uffd = new b.Uffd(0)
  uffd.register(region.id, 0, region.sizeBytes, b.constants.UFFDIO_REGISTER_MODE_MISSING)
  return { region, uffd }
}

/**
 * A source's region of `pages` pages, every page distinct and not zero (a page that arrives at the wrong place or not
 * at all shows), and its pending map with every page set (the demand thread's tests).
 */
export function sourceRegion(b: NativeBinding, pages: number): { region: Region; bytes: Uint8Array; pending: Uint32Array } {
  const region = Region.create('src', pages * b.pageSize)
  const bytes = new Uint8Array(region.buffer)
  for (let p = 0; p < pages; p++) bytes.set(randomBytes(b.pageSize), p * b.pageSize)
  return { region, bytes, pending: new Uint32Array(Math.ceil(pages / 32)).fill(0xffffffff) }
}
