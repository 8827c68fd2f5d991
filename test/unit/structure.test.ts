/**
 * The layout stays readable: no import circle in src/ (type-only imports
 * count too: a circle of types is a circle of concepts) and no file in src/
 * over 400 lines.
 */
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join, relative, resolve } from 'node:path'
import { describe, expect, it } from 'vitest'

const SRC = resolve(__dirname, '../../src')

function files(dir: string): string[] {
  return readdirSync(dir).flatMap((n) => {
    const p = join(dir, n)
    return statSync(p).isDirectory() ? files(p) : p.endsWith('.ts') ? [p] : []
  })
}

function resolveImport(from: string, spec: string): string | undefined {
  if (!spec.startsWith('.')) return undefined
  const base = resolve(dirname(from), spec)
  for (const c of [`${base}.ts`, join(base, 'index.ts')]) {
    try {
      if (statSync(c).isFile()) return c
    } catch {
      // not this one
    }
  }
  return undefined
}

/** Imports of a file: `import ... from`, `export ... from`, `import(...)`. */
function runtimeImports(path: string): string[] {
  const text = readFileSync(path, 'utf8')
  const out: string[] = []
  const re = /^\s*(import|export)\s+(type\s+)?[^'"]*?from\s+['"]([^'"]+)['"]|import\(\s*['"]([^'"]+)['"]\s*\)/gm
  for (const m of text.matchAll(re)) {
    const spec = m[3] ?? m[4]
    const target = resolveImport(path, spec)
    if (target) out.push(target)
  }
  return out
}

function findCycles(all: string[]): string[][] {
  const graph = new Map(all.map((f) => [f, runtimeImports(f)]))
  const cycles: string[][] = []
  const state = new Map<string, 'open' | 'done'>()
  const stack: string[] = []
  const visit = (f: string) => {
    state.set(f, 'open')
    stack.push(f)
    for (const g of graph.get(f) ?? []) {
      if (state.get(g) === 'open') cycles.push([...stack.slice(stack.indexOf(g)), g].map((p) => relative(SRC, p)))
      else if (!state.has(g)) visit(g)
    }
    stack.pop()
    state.set(f, 'done')
  }
  for (const f of all) if (!state.has(f)) visit(f)
  return cycles
}

describe('layout of src/', () => {
  const all = files(SRC)

  it('has no import circle', () => {
    expect(all.length).toBeGreaterThan(30)
    expect(findCycles(all)).toEqual([])
  })

  it('finds a circle when there is one (the check itself works)', () => {
    const dir = mkdtempSync(join(tmpdir(), 'cycle-'))
    writeFileSync(join(dir, 'a.ts'), "import type { B } from './b'\nexport type A = B\n")
    writeFileSync(join(dir, 'b.ts'), "import { x } from './c/index'\nexport type B = number\n")
    mkdirSync(join(dir, 'c'))
    writeFileSync(join(dir, 'c/index.ts'), "export { A } from '../a'\nexport const x = 1\n")
    const found = findCycles([join(dir, 'a.ts'), join(dir, 'b.ts'), join(dir, 'c/index.ts')])
    expect(found).toHaveLength(1)
    expect(found[0].map((p) => p.split('/').slice(-1)[0])).toEqual(['a.ts', 'b.ts', 'index.ts', 'a.ts'])
  })

  it('has no file over 400 lines', () => {
    const long = all.map((f) => [relative(SRC, f), readFileSync(f, 'utf8').split('\n').length] as const).filter(([, n]) => n > 400)
    expect(long).toEqual([])
  })
})
