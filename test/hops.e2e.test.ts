/**
 * A service moved again and again, cancelled, and a receiver that outlives
 * bad sessions: real processes (the page-store example), the CLI, real TCP,
 * real userfaultfd. Each "host" has its own runtime directory (its own
 * control sockets), as two machines would.
 */
import { connect } from 'node:net'
import { afterEach, describe, expect, it, vi } from 'vitest'
import { freePort } from '../src/cli/proc'
import { Guest } from '../src/guest'
import { loadBinding } from '../src/binding'
import { asyncWpAvailable } from '../src/agent/tracker-choice'
import { kernelSkipReason } from './helpers/gate'
import { host, killAll, page, sendAndWait, sendFailure, serviceThreads, TOKEN } from './helpers/hosts'
import { pollUntil } from './helpers/wait'
// eslint-disable-next-line @typescript-eslint/no-require-imports
const { writePage } = require('../examples/page-store/pattern.js') as { writePage: (u32: Uint32Array, p: number, v: number, words: number) => void }

const skip = kernelSkipReason()

afterEach(killAll)

describe.skipIf(skip)('a service that moves again and again', () => {
  it('A → B → A → B, every page verified after each hop', async () => {
    const A = host('a'), B = host('b')
    const [httpA, httpB] = [await freePort(), await freePort()]
    const g = `hop-${process.pid}`
    let src = A.service(g, httpA)
    await src.waitLine(/^READY/)
    const modes = ['hybrid', 'postcopy', 'precopy'] as const
    const hosts = [[A, B, httpB], [B, A, httpA], [A, B, httpB]] as const
    for (let hop = 0; hop < 3; hop++) {
      const [from, to, http] = hosts[hop]
      const port = await freePort()
      const dst = to.receive(g, port, http)
      await dst.waitLine(/waiting for the incoming migration/, 30_000, 'stderr')
      const { code, report, send } = await sendAndWait(from, g, port, ['--mode', modes[hop]])
      expect(code, send.stderr).toBe(0)
      expect(report!.mode).toBe(modes[hop])
      expect(report!.pagesSentTwiceAfterHandoff).toBe(0)
      expect((await dst.waitLine(/^VERIFY (.*)$/, 60_000))[1]).toBe('ok pages=16384')
      // the service answers at its new home, and the old one is gone with exit 0
      expect((await page(http, 1)).ok).toBe(true)
      expect((await src.exited).code).toBe(0)
      // the source hung up after the report: the destination's bulk thread ended with its connection (a guest that
      // moves on must not carry one reader thread and one dead socket per hop); only the service's own threads stay
      await pollUntil(() => !serviceThreads(dst).some((t) => t.startsWith('uffdm-')), 10_000)
      expect(serviceThreads(dst).filter((t) => t.startsWith('uffdm-'))).toEqual([])
      src = dst
    }
  }, 120_000)

  it('a guest still settling answers send with ERR_MIGRATION_BUSY', async () => {
    const A = host('a'), B = host('b')
    const g = `busy-${process.pid}`
    const port = await freePort()
    const dst = B.receive(g, port, await freePort(), ['--blocking'])
    const src = A.service(g, await freePort(), ['--writes', '0'])
    await src.waitLine(/^READY/)
    await dst.waitLine(/waiting for the incoming migration/, 30_000, 'stderr')
    // demand-only push with no idle fill: it stays in post-copy until its pages are touched
    const first = A.cli(['send', '--guest', g, '--to', `127.0.0.1:${port}`, '--mode', 'postcopy', '--prepaging', 'demand', '--idle-fill-ms', '600000'])
    await dst.waitLine(/^RESTORED/, 30_000)
    const again = await sendAndWait(B, g, await freePort())
    expect(again.code).toBe(1)
    expect(again.send.stderr).toMatch(/still settling.*\[ERR_MIGRATION_BUSY\]/)
    first.kill()
  }, 60_000)
})

describe.skipIf(skip)('cancel', () => {
  async function bigSource(A: ReturnType<typeof host>, g: string) {
    const http = await freePort()
    // 512 MiB: round 0 takes long enough to be caught in it on loopback
    const src = A.service(g, http, ['--mib', '512', '--writes', '20000'])
    await src.waitLine(/^READY/, 60_000)
    return { src, http }
  }

  it('by command in round 0, then by SIGINT of send: the source serves on, the receiver listens again, and the next migration succeeds', async () => {
    const A = host('a'), B = host('b')
    const g = `cancel-${process.pid}`
    const { src, http } = await bigSource(A, g)
    const port = await freePort()
    const dst = B.receive(g, port, await freePort(), ['--mib', '512', '--writes', '20000'])
    await dst.waitLine(/waiting for the incoming migration/, 30_000, 'stderr')
    for (const how of ['command', 'SIGINT'] as const) {
      const seen = dst.mark('stderr') // the second cancel's line, not the first one's
      // a bandwidth limit holds round 0 for half a minute: the cancel lands in it however fast the machine (a round 0 at
      // full speed could end before the cancel's process started: seen on a fast run, refused after the hand-off)
      const send = A.cli(['send', '--guest', g, '--to', `127.0.0.1:${port}`, '--mode', 'hybrid', '--max-bandwidth', '16MiB'])
      await send.waitLine(/precopy round 0/, 30_000, 'stderr') // progress lines without a TTY
      if (how === 'command') {
        const c = A.cli(['cancel', '--guest', g])
        expect((await c.exited).code, c.stderr).toBe(0)
        expect(c.lines.join('\n')).toMatch(/^cancelled: /)
      } else {
        send.kill('SIGINT')
      }
      const { code } = await send.exited
      expect(code, send.stderr).toBe(3)
      expect(send.lines.join('\n')).toMatch(/^cancelled: .*cancelled in phase precopy.*the service runs on here/)
      await dst.waitLine(/ended before the hand-off \(.*\[ERR_MIGRATION_CANCELLED\]; listening for the next source/, 10_000, 'stderr', seen)
      // the receiver's status says so too (it said precopy, from the source's address, during the session)
      const waiting = B.cli(['status', '--guest', g])
      await waiting.exited
      expect(waiting.lines.join('\n')).toMatch(/^guest .*: listening; regions [^\n]*$/)
      // the source serves on, with its data
      expect((await page(http, 3)).ok).toBe(true)
      const st = A.cli(['status', '--guest', g])
      await st.exited
      expect(st.lines[0]).toMatch(/: cancelled;/)
      expect(st.lines[1]).toMatch(/last migration: .*\[ERR_MIGRATION_CANCELLED\]/)
      // not the figures of the migration that ended (its last progress said precopy, pages left ...)
      expect(st.lines.join('\n')).not.toMatch(/pages left/)
    }
    const { code, report, send: last } = await sendAndWait(A, g, port)
    expect(code, sendFailure(last, dst)).toBe(0)
    expect(report!.pagesSentTwiceAfterHandoff).toBe(0)
    expect((await dst.waitLine(/^VERIFY (.*)$/, 60_000))[1]).toBe('ok pages=131072')
    expect((await src.exited).code).toBe(0)
  }, 180_000)

  it('by guest.cancel() in a later round and while pause() runs; refused after the hand-off', async () => {
    const port = await freePort()
    const B = host('b')
    const dst = B.receive(`api-${port}`, port, await freePort(), ['--mib', '256', '--writes', '0'])
    await dst.waitLine(/waiting for the incoming migration/, 30_000, 'stderr')
    let resumed = 0
    let cancelInPause = false
    const order: string[] = []
    // the page-store's own model: versions per page, written with its pattern (the destination verifies it)
    const PAGES = 65536
    const versions = new Uint32Array(PAGES)
    let paused = false
    // The cancel must land in a pre-copy round after round 0. With the sync-wp tracker (the suite's second pass) this
    // writer is bound by its fault round trips, the rounds after round 0 end within tens of ms, and the cancel
    // sometimes arrived in the hand-off instead (3 of 5 runs): this test keeps wp-async where the kernel has it.
    // The sync-wp pass still cancels by command and by SIGINT (the test above).
    const b = loadBinding(), probe = b.probe()
    const wpAsyncHere = asyncWpAvailable({ features: probe.features, constants: b.constants, pagemapScan: probe.pagemapScan, syncWpBuilt: true })
    const guest = await Guest.start({
      name: `api-${port}`, regions: { store: PAGES * 4096 }, token: TOKEN, control: false, exitOnMoved: false,
      ...(wpAsyncHere ? { tracker: 'wp-async' as const } : {}),
      pause: async () => {
        order.push('pause')
        paused = true
        if (cancelInPause) void guest.cancel()
        await new Promise((r) => setTimeout(r, 200))
        order.push('paused')
        return { versions: Buffer.from(versions.buffer), writesDone: 0 }
      },
      resume: () => {
        paused = false
        order.push('resume')
        resumed++
      },
    })
    const u32 = new Uint32Array(guest.regions.store.buffer)
    // every page written once, then a heavy writer: round 1 has most of the region to send again
    for (let p = 0; p < PAGES; p++) writePage(u32, p, ++versions[p], 1024)
    const writer = setInterval(() => {
      if (paused) return
      for (let i = 0; i < 3000; i++) {
        const p = (Math.random() * PAGES) | 0
        writePage(u32, p, ++versions[p], 1024)
      }
    }, 1)
    try {
      // a later round: cancel once round 1 has begun
      const onProgress = (p: { phase: string; round: number }) => {
        if (p.phase === 'precopy' && p.round >= 1) {
          guest.off('progress', onProgress)
          void guest.cancel()
        }
      }
      guest.on('progress', onProgress)
      // (a bandwidth limit keeps each round near two seconds, so the cancel lands in round 1 on a fast machine too)
      const err = await guest.migrate({ to: `127.0.0.1:${port}`, downtimeMs: 0.01, maxRounds: 100, maxBandwidth: 128 << 20 }).catch((e) => e)
      expect(err.code).toBe('ERR_MIGRATION_CANCELLED')
      expect(err.message).toMatch(/phase precopy \(round [1-9]/)
      expect(resumed).toBe(0)
      // while pause() runs: resume() comes after it
      cancelInPause = true
      // over three bulk streams: a cancel closes them too, and the destination takes the next session's streams
      const err2 = await guest.migrate({ to: `127.0.0.1:${port}`, streams: 3 }).catch((e) => e)
      expect(err2.code).toBe('ERR_MIGRATION_CANCELLED')
      expect(order).toEqual(['pause', 'paused', 'resume'])
      cancelInPause = false
      clearInterval(writer)
      // after the hand-off: refused, and the migration completes
      const moving = guest.migrate({ to: `127.0.0.1:${port}`, mode: 'postcopy', streams: 3 })
      await new Promise<void>((r) => guest.once('progress', (p: { phase: string }) => p.phase === 'postcopy' && r()) && setTimeout(r, 2000))
      expect((await moving).streams).toBe(3)
      const refused = await guest.cancel().catch((e) => e)
      expect(['ERR_MIGRATION_CANCEL_REFUSED', 'ERR_INVALID_ARG']).toContain(refused.code)
      expect((await dst.waitLine(/^VERIFY (.*)$/, 60_000))[1]).toBe('ok pages=65536')
    } finally {
      clearInterval(writer)
      await guest.close()
    }
  }, 120_000)
})

describe.skipIf(skip)('a receiver that keeps listening', () => {
  it('survives a wrong token, garbage bytes, a cancelled session and a killed source, then accepts a real migration', async () => {
    const A = host('a'), B = host('b')
    const g = `survive-${process.pid}`
    const port = await freePort()
    const dst = B.receive(g, port, await freePort())
    await dst.waitLine(/waiting for the incoming migration/, 30_000, 'stderr')
    // garbage bytes
    await new Promise<void>((resolve) => {
      const s = connect(port, '127.0.0.1', () => s.end(Buffer.alloc(64, 0xff)))
      s.on('close', () => resolve())
      s.on('error', () => resolve())
    })
    await dst.waitLine(/refused a connection from 127\.0\.0\.1:\d+: .*\[ERR_MIGRATION_PROTOCOL\]/, 10_000, 'stderr')
    // a wrong token
    const wrong = host('w')
    wrong.env.UFFD_MIGRATE_TOKEN = 'a-wrong-token-0123456789'
    const ws = wrong.service(`w-${g}`, await freePort())
    await ws.waitLine(/^READY/)
    const bad = await sendAndWait(wrong, `w-${g}`, port)
    expect(bad.code).toBe(1)
    expect(bad.send.stderr).toMatch(/ERR_MIGRATION_AUTH/)
    await dst.waitLine(/refused a connection from .*\[ERR_MIGRATION_AUTH\]/, 10_000, 'stderr')
    // a killed source, in pre-copy
    const doomed = A.service(`${g}`, await freePort(), ['--mib', '64'])
    await doomed.waitLine(/^READY/)
    // (a bandwidth limit holds round 0 for seconds: the kill lands in pre-copy however fast the machine)
    const send = A.cli(['send', '--guest', g, '--to', `127.0.0.1:${port}`, '--mode', 'precopy', '--downtime-ms', '0.01', '--max-rounds', '1000', '--max-bandwidth', '8MiB'])
    await send.waitLine(/precopy round/, 30_000, 'stderr')
    doomed.kill()
    await send.exited
    await dst.waitLine(/ended before the hand-off .*listening for the next source/, 10_000, 'stderr')
    // the real one
    const src = A.service(g, await freePort())
    await src.waitLine(/^READY/)
    const { code, report, send: last } = await sendAndWait(A, g, port)
    expect(code, sendFailure(last, dst)).toBe(0)
    expect(report!.pagesSentTwiceAfterHandoff).toBe(0)
    expect((await dst.waitLine(/^VERIFY (.*)$/, 60_000))[1]).toBe('ok pages=16384')
  }, 120_000)
})

describe.skipIf(skip)('exit codes', () => {
  it('receive passes its child\'s end through: 128 + the signal', async () => {
    for (const [sig, code] of [['SIGKILL', 137], ['SIGTERM', 143]] as const) {
      const B = host('b')
      const r = B.cli(['receive', '--listen', `127.0.0.1:${await freePort()}`, '--', process.execPath, '-e', 'console.log(process.pid); setInterval(() => {}, 1000)'])
      const [pid] = await r.waitLine(/^\d+$/)
      process.kill(Number(pid), sig)
      expect((await r.exited).code).toBe(code)
    }
  })

  it('a source whose destination dies in post-copy exits 4, and so does send', async () => {
    const A = host('a'), B = host('b')
    const g = `die-${process.pid}`
    const port = await freePort()
    const dst = B.receive(g, port, await freePort(), ['--blocking', '--writes', '0'])
    const src = A.service(g, await freePort(), ['--writes', '0'])
    await src.waitLine(/^READY/)
    await dst.waitLine(/waiting for the incoming migration/, 30_000, 'stderr')
    const send = A.cli(['send', '--guest', g, '--to', `127.0.0.1:${port}`, '--mode', 'postcopy', '--prepaging', 'demand', '--idle-fill-ms', '600000', '--recovery-timeout-ms', '300', '--json'])
    await dst.waitLine(/^RESTORED/, 30_000)
    dst.kill('SIGTERM') // receive passes it to the service: the destination dies in post-copy
    expect((await send.exited).code, send.stderr).toBe(4)
    expect(send.stderr).toMatch(/after the hand-off/)
    // --json: the outcome for a script, with where the service runs now
    expect(JSON.parse(send.lines.join('\n'))).toMatchObject({ outcome: 'failed', code: 'ERR_MIGRATION_CONNECTION', exitCode: 4, serviceRunsOn: 'destination' })
    expect((await src.exited).code, src.stderr + src.lines.join('|')).toBe(4)
    expect(src.stderr).toMatch(/the migration to 127\.0\.0\.1:\d+ failed: .*; after the hand-off: the service does not run here/)
    expect(src.stderr).toMatch(/exiting with code 4: the service does not run here any more, and did not settle there/)
  }, 60_000)

  it('a once(\'moved\') listener keeps the source\'s process, as an on() listener does', async () => {
    const port = await freePort()
    const destP = Guest.start({ name: `once-dst-${port}`, regions: { store: 1 << 20 }, receive: `127.0.0.1:${port}`, token: TOKEN, control: false, exitOnMoved: false })
    const src = await Guest.start({ name: `once-src-${port}`, regions: { store: 1 << 20 }, token: TOKEN, control: false })
    const u8 = new Uint8Array(src.regions.store.buffer)
    u8[4096] = 7
    let moved = 0
    src.once('moved', () => moved++)
    const exits: unknown[] = []
    const exit = vi.spyOn(process, 'exit').mockImplementation(((code?: number) => void exits.push(code)) as typeof process.exit)
    try {
      await src.migrate({ to: `127.0.0.1:${port}` })
      const dst = await destP
      await dst.settled
      await new Promise((r) => setTimeout(r, 300)) // past the 50 ms after which a process without a listener closes and exits
      expect(moved).toBe(1)
      expect(exits).toEqual([])
      expect(src.phase).toBe('moved')
      expect(new Uint8Array(dst.regions.store.buffer)[4096]).toBe(7)
      await dst.close()
    } finally {
      exit.mockRestore()
      await src.close()
    }
  })
})
