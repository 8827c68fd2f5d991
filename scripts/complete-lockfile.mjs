#!/usr/bin/env node
// The npm registry this project installs from holds only the Linux builds of
// platform packages (rollup, msgpackr-extract, ...). npm then writes a lock
// file without the other platforms' optional dependencies, and `npm ci`
// refuses it as "out of sync". This adds those entries, with the os/cpu/libc
// that their names declare, so that `npm ci` accepts the lock and skips them
// (they never install on Linux x64). Run after every `npm install`:
//   node scripts/complete-lockfile.mjs
import { readFileSync, writeFileSync } from 'node:fs'

const OS = ['android', 'darwin', 'freebsd', 'linux', 'openbsd', 'openharmony', 'win32', 'netbsd', 'sunos', 'aix']
const CPU = ['arm64', 'arm', 'x64', 'ia32', 'loong64', 'ppc64', 'riscv64', 's390x', 'mips64el']

const path = new URL('../package-lock.json', import.meta.url)
const lock = JSON.parse(readFileSync(path, 'utf8'))
const pkgs = lock.packages
let added = 0
for (const [where, entry] of Object.entries(pkgs)) {
  for (const [name, range] of Object.entries(entry.optionalDependencies ?? {})) {
    const key = `node_modules/${name}`
    if (pkgs[key] || pkgs[`${where}/${key}`]) continue
    const parts = name.split('/').pop().split('-')
    const os = parts.find((p) => OS.includes(p))
    const cpu = parts.find((p) => CPU.includes(p))
    if (!os || !cpu) {
      console.error(`complete-lockfile: cannot tell the platform of ${name}; left out`)
      continue
    }
    const libc = parts.includes('musl') ? ['musl'] : os === 'linux' && parts.includes('gnu') ? ['glibc'] : undefined
    const version = String(range).replace(/^[\^~=]/, '')
    pkgs[key] = { version, ...(entry.dev ? { dev: true } : {}), optional: true, os: [os], cpu: [cpu], ...(libc ? { libc } : {}) }
    added++
  }
}
lock.packages = Object.fromEntries(Object.entries(pkgs).sort(([a], [b]) => (a === '' ? -1 : b === '' ? 1 : a.localeCompare(b))))
writeFileSync(path, JSON.stringify(lock, null, 2) + '\n')
console.log(`complete-lockfile: added ${added} platform entries`)
