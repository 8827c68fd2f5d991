// Small helpers for benchmark output: an aligned text table and sample statistics.

/**
 * Prints an aligned text table: header, a rule, then the rows. Cells are
 * stringified; the first column is left-aligned, the others too unless they
 * look numeric (then right-aligned). A row that is a string is printed as a
 * section line spanning the table.
 * @param {string[]} header
 * @param {(Array<unknown>|string)[]} rows
 * @param {{ out?: (line: string) => void, sep?: string, align?: ('l'|'r'|'auto')[] }} [opts]
 *   align: per column; 'auto' (the default) right-aligns numeric-looking cells
 */
export function printTable(header, rows, { out = (l) => console.log(l), sep = ' | ', align = [] } = {}) {
  const cells = rows.map((r) => (typeof r === 'string' ? r : r.map((c) => (c === undefined || c === null ? '' : String(c)))))
  const widths = header.map((h) => String(h).length)
  for (const r of cells) {
    if (typeof r === 'string') continue
    r.forEach((c, i) => (widths[i] = Math.max(widths[i] ?? 0, c.length)))
  }
  const numeric = /^[-+~<>≤≥]?\s*[\d.]+(e[-+]?\d+)?\s*(x|%|[a-zµ/]+)?$/i
  const line = (r, isHeader) =>
    r
      .map((c, i) => {
        const a = align[i] ?? (i === 0 ? 'l' : 'auto')
        const right = !isHeader && (a === 'r' || (a === 'auto' && numeric.test(c)))
        return right ? c.padStart(widths[i]) : c.padEnd(widths[i])
      })
      .join(sep)
      .trimEnd()
  const total = widths.reduce((a, w) => a + w, 0) + sep.length * (widths.length - 1)
  out(line(header.map(String), true))
  out(widths.map((w) => '-'.repeat(w)).join(sep.replace(/ /g, '-')))
  for (const r of cells) out(typeof r === 'string' ? `${r} `.padEnd(total, '·') : line(r, false))
}

/**
 * min / median / max and nearest-rank p50 / p99 of numeric samples (the
 * same definitions as the C reference in ../shared/limits/common.h: median is
 * the mean of the two middle values for an even count; percentiles take the
 * sample at index floor(p/100 * n)).
 * @param {ArrayLike<number>} samples
 */
export function stats(samples) {
  const n = samples.length
  if (n === 0) return { n: 0, min: NaN, median: NaN, max: NaN, mean: NaN, p50: NaN, p99: NaN }
  const s = Float64Array.from(samples).sort()
  let sum = 0
  for (let i = 0; i < n; i++) sum += s[i]
  const pct = (p) => s[Math.min(n - 1, Math.floor((p / 100) * n))]
  return {
    n,
    min: s[0],
    median: n & 1 ? s[n >> 1] : 0.5 * (s[n / 2 - 1] + s[n / 2]),
    max: s[n - 1],
    mean: sum / n,
    p50: pct(50),
    p99: pct(99),
  }
}

/** A number with about 3–4 significant digits, no exponent for everyday sizes. */
export function fmt(v) {
  if (v === undefined || v === null || Number.isNaN(v)) return '—'
  if (!Number.isFinite(v)) return String(v)
  const a = Math.abs(v)
  if (a === 0) return '0'
  if (a >= 1000) return v.toFixed(0)
  if (a >= 100) return v.toFixed(1)
  if (a >= 10) return v.toFixed(2)
  if (a >= 1) return v.toFixed(3)
  return v.toPrecision(3)
}
