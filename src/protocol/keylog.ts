/**
 * $UFFD_MIGRATE_KEYLOG=FILE: each encrypted connection's two direction keys,
 * appended to FILE as the handshake derives them (SSLKEYLOGFILE's idea: a
 * capture of the link can then be read, or a test relay can find a frame in a
 * sealed stream, src/testing/relay.ts). One line per connection and side:
 *
 *   UFFDM_KEYS <source's HELLO nonce> <to-destination key> <iv> <to-source key> <iv>   (hex)
 *
 * Anyone who reads FILE reads those migrations: off unless set, the file is
 * created owner-only, and a process says once on stderr that it writes it.
 */
import { appendFileSync } from 'node:fs'
import type { DirectionKey } from './records'

let warned = false

/** Appends the connection's keys to $UFFD_MIGRATE_KEYLOG, if set. clientNonce: the source's HELLO nonce, which names the connection on the wire. */
export function logKeys(clientNonce: Uint8Array, keys: { toServer: DirectionKey; toClient: DirectionKey }, env: NodeJS.ProcessEnv = process.env): void {
  const file = env.UFFD_MIGRATE_KEYLOG
  if (!file) return
  if (!warned) {
    warned = true
    process.stderr.write(`uffd-migrate: writing encryption keys to ${file} ($UFFD_MIGRATE_KEYLOG): whoever reads it can read these migrations\n`)
  }
  const hex = (b: Uint8Array) => Buffer.from(b).toString('hex')
  try {
    appendFileSync(file, `UFFDM_KEYS ${hex(clientNonce)} ${hex(keys.toServer.key)} ${hex(keys.toServer.iv)} ${hex(keys.toClient.key)} ${hex(keys.toClient.iv)}\n`, { mode: 0o600 })
  } catch (err) {
    // a debugging aid: a path that cannot be written says so (once) and fails no migration
    if (!unwritable) process.stderr.write(`uffd-migrate: cannot write the key log ${file}: ${(err as Error).message}; migrations go on without it\n`)
    unwritable = true
  }
}

let unwritable = false

/** The keys a key log holds for the connection whose source HELLO carried this nonce (undefined: none yet). */
export function findKeys(log: string, clientNonce: Uint8Array): { toServer: DirectionKey; toClient: DirectionKey } | undefined {
  const want = Buffer.from(clientNonce).toString('hex')
  for (const line of log.split('\n')) {
    const f = line.split(' ')
    if (f[0] !== 'UFFDM_KEYS' || f[1] !== want || f.length < 6) continue
    const b = (s: string) => Buffer.from(s, 'hex')
    return { toServer: { key: b(f[2]), iv: b(f[3]) }, toClient: { key: b(f[4]), iv: b(f[5]) } }
  }
  return undefined
}
