/**
 * Hostile and stuck peers against a real `uffd-migrate receive` (the
 * page-store example, real TCP, real userfaultfd): what unauthenticated
 * connections may cost the destination, a connection flood under the default
 * open-file limit, a squatting authenticated connection, and a source
 * stopped (SIGSTOP) in post-copy.
 */
import { readdirSync, readFileSync } from 'node:fs'
import { connect, type Socket } from 'node:net'
import { afterEach, describe, expect, it } from 'vitest'
import { Channel } from '../src/protocol/channel'
import { clientHandshake } from '../src/protocol/handshake'
import { freePort, type LineProc } from '../src/cli/proc'
import { kernelSkipReason } from './helpers/gate'
import { killAll, page, ready, sendAndWait, sendFailure, TOKEN, twoHosts } from './helpers/hosts'

const skip = kernelSkipReason()
afterEach(killAll)

const MiB = 1 << 20
/** The service process under `receive` (its only child). */
function childPid(pid: number): number {
  for (const d of readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue
    const stat = (() => {
      try {
        return readFileSync(`/proc/${d}/stat`, 'utf8')
      } catch {
        return ''
      }
    })()
    // pid (comm) state ppid ...: comm may hold spaces, so read after its last ')'
    if (Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]) === pid) return Number(d)
  }
  throw new Error(`no child of ${pid}`)
}
const rssBytes = (pid: number) => Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))![1]) * 1024

/** A peer that announces a 64 MiB HELLO and sends 63 MiB of it (as fast as the destination takes it). */
function bigHello(port: number): Promise<number> {
  return new Promise((resolve) => {
    let sent = 0
    const s: Socket = connect(port, '127.0.0.1', () => {
      const header = Buffer.alloc(5)
      header.writeUInt32BE(64 * MiB, 0)
      header[4] = 1 // HELLO
      s.write(header)
      const chunk = Buffer.alloc(MiB, 0x41)
      const pump = () => {
        while (sent < 63 * MiB && !s.destroyed) {
          sent += chunk.length
          if (!s.write(chunk)) return void s.once('drain', pump)
        }
      }
      pump()
    })
    s.on('error', () => {})
    s.on('close', () => resolve(sent))
  })
}

describe.skipIf(skip)('a receiver under hostile peers', () => {
  it('16 connections that announce 64 MiB and send 63 MiB before authenticating cost it less than 10 MiB; status counts them; a real migration follows', async () => {
    const { A, B, g, port, dst } = await twoHosts('big')
    const service = childPid(dst.child.pid!)
    const before = rssBytes(service)
    let peak = before
    const sampler = setInterval(() => (peak = Math.max(peak, rssBytes(service))), 5)
    await Promise.all(Array.from({ length: 16 }, () => bigHello(port)))
    clearInterval(sampler)
    peak = Math.max(peak, rssBytes(service))
    console.log(`hostile: destination RSS ${(before / MiB).toFixed(1)} MiB before, peak ${(peak / MiB).toFixed(1)} MiB during 16 x 64 MiB announced frames`)
    // under test:asan RSS also holds ASan's quarantine of freed memory and its redzones, which is not what the
    // destination keeps; the 10 MiB bound is the product's, checked in the normal run
    const asan = /libasan/.test(process.env.LD_PRELOAD ?? '')
    expect(peak - before).toBeLessThan((asan ? 32 : 10) * MiB)
    const refusals = dst.errLines.filter((l) => /refused a connection from 127\.0\.0\.1:\d+: expected a frame of 1\.\.4097 bytes, got a length of 67108864 \[ERR_MIGRATION_PROTOCOL\]/.test(l))
    expect(refusals).toHaveLength(16)
    const status = B.cli(['status', '--guest', g, '--json'])
    await status.exited
    expect(JSON.parse(status.lines.join('\n'))).toMatchObject({ phase: 'listening', refusals: { ERR_MIGRATION_PROTOCOL: 16 } })
    await ready(A.service(g, await freePort()))
    const { code, send } = await sendAndWait(A, g, port)
    expect(code, sendFailure(send, dst)).toBe(0)
    expect((await dst.waitLine(/^VERIFY (.*)$/, 60_000))[1]).toBe('ok pages=16384')
  }, 120_000)

  it('2,000 idle connections do not stop a real migration (the destination has the default open-file limit of 1024)', async () => {
    const { A, g, port, dst } = await twoHosts('flood', { fileLimit: 1024 })
    // the flood: its own process, with room for 2,000 sockets; it holds whatever the destination keeps open
    const flood = A.run(['-c', `ulimit -n 8192 && exec "$0" -e "$1" ${port}`, process.execPath, `
      const net = require('node:net'); let open = 0, closed = 0
      for (let i = 0; i < 2000; i++) {
        const s = net.connect(Number(process.argv[1]), '127.0.0.1', () => { if (++open === 2000) console.log('CONNECTED') })
        s.on('error', () => {}); s.on('close', () => closed++)
      }
      setInterval(() => console.log('open', open, 'closed', closed), 1000)`], '/bin/bash')
    await flood.waitLine(/^CONNECTED$/, 30_000)
    await ready(A.service(g, await freePort()))
    const { code, send } = await sendAndWait(A, g, port)
    expect(code, send.stderr).toBe(0)
    expect((await dst.waitLine(/^VERIFY (.*)$/, 60_000))[1]).toBe('ok pages=16384')
    // the flood was real: most of it was closed to make room
    expect(dst.errLines.filter((l) => /closed to make room: 16 connections were authenticating/.test(l)).length).toBeGreaterThan(1000)
  }, 120_000)

  it('a squatting authenticated connection delays a real send by at most the handshake deadline', async () => {
    const { A, g, port, dst } = await twoHosts('squat')
    const sock = connect(port, '127.0.0.1')
    await new Promise((r) => sock.once('connect', r))
    const squatter = new Channel(sock, 'urgent')
    await clientHandshake(squatter, Buffer.from(TOKEN, 'utf8'), { role: 'urgent', session: 'squatter' })
    await ready(A.service(g, await freePort()))
    const t0 = performance.now()
    const { code, send } = await sendAndWait(A, g, port)
    const elapsedMs = performance.now() - t0
    console.log(`hostile: send beside a squatter took ${elapsedMs.toFixed(0)} ms (handshake deadline 5000 ms)`)
    expect(code, send.stderr).toBe(0)
    expect(dst.errLines.join('\n')).toMatch(/session squatter authenticated but did not send its region table within 5000 ms; its slot is free again/)
    expect(squatter.failed).toBeDefined()
    expect((await dst.waitLine(/^VERIFY (.*)$/, 60_000))[1]).toBe('ok pages=16384')
  }, 120_000)
})

/**
 * The page-store moved in post-copy, demand only (pages stay missing, and the link quiet but for KEEPALIVE, until the
 * destination's service faults); `stall` stops a peer once the service runs at the destination and lets it go again.
 * The migration must then settle after a recovery, with every byte verified.
 */
async function stalledPostcopy(name: string, sendArgs: string[], stall: (p: { src: LineProc; dst: LineProc }) => Promise<void>): Promise<void> {
  const { A, g, port, http, dst } = await twoHosts(name, { receiveArgs: ['--blocking'] })
  const src = A.service(g, await freePort())
  await ready(src)
  const send = A.cli(['send', '--guest', g, '--to', `127.0.0.1:${port}`, '--mode', 'postcopy', '--prepaging', 'demand', '--idle-fill-ms', '600000', ...sendArgs, '--json'])
  await dst.waitLine(/^RESTORED/, 30_000)
  await stall({ src, dst })
  const { code } = await send.exited
  expect(code, send.stderr).toBe(0)
  const report = JSON.parse(send.lines.join('\n'))
  expect(report.postcopy.recoveries).toBeGreaterThanOrEqual(1)
  expect(report.pagesSentTwiceAfterHandoff).toBe(0)
  expect((await dst.waitLine(/^VERIFY (.*)$/, 60_000))[1]).toBe('ok pages=16384')
  expect((await page(http, 1)).ok).toBe(true)
}

describe.skipIf(skip)('a peer stopped in post-copy', () => {
  it('the source, SIGSTOP beyond requestTimeoutMs: the destination recovers; after SIGCONT the migration settles with every byte verified', async () => {
    await stalledPostcopy('stop', ['--request-timeout-ms', '1000'], async ({ src, dst }) => {
      src.kill('SIGSTOP', false)
      await dst.waitLine(/the source looks stuck: a page request has been unanswered for \d+ ms \(requestTimeoutMs 1000\)/, 30_000, 'stderr')
      src.kill('SIGCONT', false)
    })
  }, 120_000)

  it('the destination, SIGSTOP beyond linkTimeoutMs: the source takes it for stuck, says so, and dials back; after SIGCONT the migration settles with every byte verified', async () => {
    await stalledPostcopy('dstop', ['--link-timeout-ms', '2000'], async ({ src, dst }) => {
      const service = childPid(dst.child.pid!) // the destination's agent is a thread of its service's process
      process.kill(service, 'SIGSTOP')
      try {
        // before: the source waited for ever, without a line (the kernel of a stopped process still answers TCP)
        await src.waitLine(/broke after the hand-off \(the destination looks stuck: nothing arrived from it for \d+ ms \(linkTimeoutMs 2000; a live destination sends KEEPALIVE\)/, 30_000, 'stderr')
      } finally {
        process.kill(service, 'SIGCONT')
      }
    })
  }, 120_000)
})
