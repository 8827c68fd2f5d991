import type { NativeBinding, NativeUffd } from '../../src/binding'
import { Region } from '../../src/region'

/** A region of `pages` pages registered for missing-page faults with a uffd of its own (the native tests'). */
export function missingRegion(b: NativeBinding, pages: number): { region: Region; uffd: NativeUffd } {
  const region = Region.create('t', pages * b.pageSize)
  const uffd = new b.Uffd(0)
  uffd.register(region.id, 0, region.sizeBytes, b.constants.UFFDIO_REGISTER_MODE_MISSING)
  return { region, uffd }
}
