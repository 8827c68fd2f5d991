/**
 * The bulk socket's kernel settings, on real loopback TCP sockets: buffers as
 * granted (past net.core.rmem_max / wmem_max with CAP_NET_ADMIN, up to them
 * without, not at all when asked whole and they would cut it), and the unsent
 * limit of the post-copy push (TCP_NOTSENT_LOWAT) as a writer sees it.
 */
import { spawnSync } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { createServer, connect, type Socket } from 'node:net'
import { join } from 'node:path'
import { afterEach, describe, expect, it } from 'vitest'
import { loadBinding } from '../src/binding'

const binding = loadBinding()
const MiB = 1 << 20
const caps = {
  send: Number(readFileSync('/proc/sys/net/core/wmem_max', 'utf8')),
  receive: Number(readFileSync('/proc/sys/net/core/rmem_max', 'utf8')),
}

const opened: { close(): void }[] = []
afterEach(() => opened.splice(0).forEach((x) => x.close()))

/** A connected loopback pair; the accepted end never reads (paused). */
async function pair(): Promise<{ client: Socket; fd: number }> {
  const server = createServer((s) => s.pause())
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r))
  const port = (server.address() as { port: number }).port
  const client = connect(port, '127.0.0.1')
  await new Promise((r) => client.once('connect', r))
  opened.push({ close: () => (client.destroy(), server.close()) })
  return { client, fd: (client as unknown as { _handle: { fd: number } })._handle.fd }
}

/** Bytes the kernel took from `chunks` x 64 KiB written to a peer that does not read, once it stopped taking more. */
async function acceptedBytes(client: Socket, chunks: number): Promise<number> {
  for (let i = 0; i < chunks; i++) client.write(Buffer.alloc(64 << 10))
  let last = -1
  for (;;) {
    await new Promise((r) => setTimeout(r, 50))
    const taken = chunks * (64 << 10) - client.writableLength
    if (taken === last) return taken
    last = taken
  }
}

describe('bulk socket settings', () => {
  it('grants buffers as asked; past net.core.rmem_max / wmem_max only with CAP_NET_ADMIN (root here), else at the cap, or not at all when asked whole', async () => {
    const { fd } = await pair()
    expect(binding.setSocketBuffers(fd, 512 << 10, 256 << 10)).toEqual({ sendBytes: 512 << 10, receiveBytes: 256 << 10 })
    expect(binding.setSocketBuffers(fd, 0, 0)).toEqual({ sendBytes: 0, receiveBytes: 0 })
    if (process.getuid?.() !== 0) {
      console.warn('\n*** SKIPPING the CAP_NET_ADMIN half of this test: not root\n')
      return
    }
    const past = Math.max(caps.send, caps.receive) * 2
    expect(binding.setSocketBuffers(fd, past, past, true)).toEqual({ sendBytes: past, receiveBytes: past })
    // the same in a process without capabilities (nobody): at the cap, or left to autotuning when asked whole
    const script = `
      const net = require('node:net'), b = require(${JSON.stringify(join(__dirname, '..', 'dist', 'binding.js'))}).loadBinding()
      const s = net.createServer((c) => c.pause()).listen(0, '127.0.0.1', () => {
        const c = net.connect(s.address().port, '127.0.0.1', () => {
          const fd = c._handle.fd
          const capped = b.setSocketBuffers(fd, ${past}, ${past})
          const c2 = net.connect(s.address().port, '127.0.0.1', () => {
            const whole = b.setSocketBuffers(c2._handle.fd, ${past}, ${past}, true)
            console.log(JSON.stringify({ capped, whole }))
            process.exit(0)
          })
        })
      })`
    if (spawnSync('setpriv', ['--version']).status !== 0) {
      console.warn('\n*** SKIPPING the no-capability half of this test: no setpriv (util-linux) to drop them\n')
      return
    }
    const run = spawnSync('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', '--inh-caps=-all', process.execPath, '-e', script], { encoding: 'utf8' })
    expect(run.status, run.stderr).toBe(0)
    expect(JSON.parse(run.stdout)).toEqual({ capped: { sendBytes: caps.send, receiveBytes: caps.receive }, whole: { sendBytes: 0, receiveBytes: 0 } })
  })

  it('an unsent limit keeps a writer to a peer that does not read to the window plus the limit, where its send buffer would take MiBs', async () => {
    const plain = await pair()
    binding.setSocketBuffers(plain.fd, 4 * MiB, 0)
    const limited = await pair()
    binding.setSocketBuffers(limited.fd, 4 * MiB, 0)
    binding.setSocketUnsentLimit(limited.fd, 128 << 10)
    const withoutLimit = await acceptedBytes(plain.client, 256)
    const withLimit = await acceptedBytes(limited.client, 256)
    expect(withoutLimit).toBeGreaterThan(4 * MiB)
    expect(withLimit).toBeLessThan(MiB)
    expect(withLimit).toBeGreaterThanOrEqual(128 << 10)
  })
})
