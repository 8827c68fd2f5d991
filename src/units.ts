/** Sizes for people: the CLI's tables and the agents' log lines. */
export function bytes(n: number): string {
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB']
  let i = 0
  while (Math.abs(n) >= 1024 && i < u.length - 1) (n /= 1024), i++
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`
}

/** A bandwidth limit for people: '64.0 MiB/s', or 'no limit' for 0. */
export function perSecond(bytesPerSec: number): string {
  return bytesPerSec ? `${bytes(bytesPerSec)}/s` : 'no limit'
}

/** Both limits of a migration, as the CLI and the log lines say them. */
export function limitsText(l: { precopyBytesPerSec: number; postcopyBytesPerSec: number }): string {
  return `pre-copy ${perSecond(l.precopyBytesPerSec)}, post-copy push ${perSecond(l.postcopyBytesPerSec)}`
}

const RATE_UNITS: Record<string, number> = {
  '': 1, b: 1,
  kb: 1e3, mb: 1e6, gb: 1e9, tb: 1e12,
  k: 1024, kib: 1024, m: 1024 ** 2, mib: 1024 ** 2, g: 1024 ** 3, gib: 1024 ** 3, t: 1024 ** 4, tib: 1024 ** 4,
  bit: 1 / 8, kbit: 1e3 / 8, mbit: 1e6 / 8, gbit: 1e9 / 8, tbit: 1e12 / 8,
}

/**
 * A rate for people, as bytes a second: '100MiB' (or '100M', '100MiB/s'), '50MB' (SI), '800Mbit', '10Gbit', a plain
 * byte count, or 0 / 'unlimited' / 'none' for no limit (0). undefined: not a rate.
 */
export function parseRate(text: string): number | undefined {
  const t = text.trim().toLowerCase()
  if (t === 'unlimited' || t === 'none') return 0
  const m = /^(\d+(?:\.\d+)?)\s*([a-z]*)(?:\/s)?$/.exec(t)
  if (!m || !(m[2] in RATE_UNITS)) return undefined
  return Math.floor(Number(m[1]) * RATE_UNITS[m[2]])
}
