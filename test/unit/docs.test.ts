/** The README shows code that runs: its quick start is examples/quickstart/server.cjs, verbatim. */
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'

const root = join(__dirname, '../..')

describe('README', () => {
  it('quick start block is examples/quickstart/server.cjs as it is (a test moves that file there and back)', () => {
    const readme = readFileSync(join(root, 'README.md'), 'utf8')
    const start = readme.indexOf('## Quick start')
    const block = /```js\n([\s\S]*?)```/.exec(readme.slice(start))
    expect(block?.[1]).toBe(readFileSync(join(root, 'examples/quickstart/server.cjs'), 'utf8'))
  })

  it('lists every send flag the CLI has', () => {
    const readme = readFileSync(join(root, 'README.md'), 'utf8')
    const main = readFileSync(join(root, 'src/cli/main.ts'), 'utf8')
    const flags = [...main.matchAll(/(?:option|Option)\('(--[a-z-]+)/g)].map((m) => m[1])
    expect(flags.length).toBeGreaterThan(15)
    for (const f of new Set(flags)) expect(readme, f).toContain(f)
  })
})
