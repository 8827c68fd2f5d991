// Writes the state tables of docs/protocol.md from the code (dist/, built by `npm run build:ts`).
import { readFileSync, writeFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { join, dirname } from 'node:path'
import { fileURLToPath } from 'node:url'

const root = join(dirname(fileURLToPath(import.meta.url)), '..')
const { renderProtocolTables, TABLES_BEGIN, TABLES_END } = createRequire(import.meta.url)(join(root, 'dist/agent/protocol-tables.js'))
const path = join(root, 'docs/protocol.md')
const doc = readFileSync(path, 'utf8')
const a = doc.indexOf(TABLES_BEGIN), b = doc.indexOf(TABLES_END)
if (a < 0 || b < 0) {
  process.stderr.write(`docs/protocol.md has no state-table markers; put these two lines where the tables go:\n${TABLES_BEGIN}\n${TABLES_END}\n`)
  process.exit(1)
}
writeFileSync(path, doc.slice(0, a) + renderProtocolTables() + doc.slice(b + TABLES_END.length))
process.stdout.write('docs/protocol.md: state tables written\n')
