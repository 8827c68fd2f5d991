/** What a fuzz session migrates: its regions' sizes, and every page's content, seeded. */

/** Pages of each region of a fuzz session. */
export const LAYOUT = [16, 8]

/** Every page's final content: data (a seeded pattern) or zero. */
export class Content {
  readonly zero: boolean[][]
  readonly changed: boolean[][]
  constructor(private readonly seed: number, rand: () => number, readonly ps: number) {
    this.zero = LAYOUT.map((n) => Array.from({ length: n }, () => rand() < 0.25))
    this.changed = LAYOUT.map((n, r) => Array.from({ length: n }, (_, p) => !this.zero[r][p] && rand() < 0.3))
  }

  page(region: number, page: number, version: 0 | 1): Buffer {
    const b = Buffer.alloc(this.ps)
    for (let i = 0; i < this.ps; i += 4) b.writeUInt32LE((this.seed * 2654435761 + region * 7919 + page * 104729 + version * 31 + i) >>> 0, i)
    return b
  }

  final(region: number, page: number): Buffer {
    return this.zero[region][page] ? Buffer.alloc(this.ps) : this.page(region, page, this.changed[region][page] ? 1 : 0)
  }
}
