// Raw single-stream TCP throughput between two hosts, with Node on both ends:
// what a link (loopback, or a shaped veth into a network namespace) carries
// when nothing but a socket is in the way. The receiver runs as its own
// process (possibly under `ip netns exec NS`), the sender in this process.
//
// As a script: `node tcp-tput.mjs sink HOST` listens on HOST (port 0), prints
// `PORT <n>`, then, when the sender closes, one line of JSON with the
// receive timeline {samples: [[ms since first byte, bytes so far], ...]}.
import { spawn } from 'node:child_process'
import { createConnection, createServer } from 'node:net'
import { fileURLToPath } from 'node:url'

const self = fileURLToPath(import.meta.url)

function sink(host) {
  const srv = createServer((sock) => {
    let bytes = 0
    let t0 = 0
    const samples = []
    const tick = setInterval(() => t0 && samples.push([performance.now() - t0, bytes]), 50)
    sock.on('data', (c) => {
      if (!t0) t0 = performance.now()
      bytes += c.length
    })
    sock.on('close', () => {
      clearInterval(tick)
      samples.push([performance.now() - t0, bytes])
      process.stdout.write(JSON.stringify({ bytes, samples }) + '\n', () => process.exit(0))
    })
    sock.on('error', () => {})
  })
  srv.listen(0, host, () => process.stdout.write(`PORT ${srv.address().port}\n`))
}

/**
 * Sends as fast as possible for `seconds` to a sink started with `prefix`
 * (e.g. ['ip', 'netns', 'exec', ns]) on `host`. Returns MiB/s over the
 * timeline after `skipMs` (slow start, the token bucket's initial burst).
 * @param {{host: string, prefix?: string[], seconds?: number, skipMs?: number, chunk?: number}} o
 */
export async function measureTcp({ host, prefix = [], seconds = 3, skipMs = 500, chunk = 1 << 20 }) {
  const argv = [...prefix, process.execPath, self, 'sink', host]
  const child = spawn(argv[0], argv.slice(1), { stdio: ['ignore', 'pipe', 'pipe'] })
  let out = ''
  let err = ''
  child.stdout.setEncoding('utf8').on('data', (c) => (out += c))
  child.stderr.setEncoding('utf8').on('data', (c) => (err += c))
  const exited = new Promise((r) => child.once('exit', r))
  try {
    const port = await new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`tcp sink did not start: ${err.trim()}`)), 10_000)
      const poll = setInterval(() => {
        const m = /^PORT (\d+)$/m.exec(out)
        if (m) {
          clearTimeout(t)
          clearInterval(poll)
          resolve(Number(m[1]))
        }
      }, 10)
      child.once('exit', (code) => {
        clearTimeout(t)
        clearInterval(poll)
        reject(new Error(`tcp sink exited (${code}): ${err.trim()}`))
      })
    })
    const buf = Buffer.alloc(chunk, 0x5a)
    await new Promise((resolve, reject) => {
      const s = createConnection({ host, port }, () => {
        const end = performance.now() + seconds * 1000
        const pump = () => {
          while (performance.now() < end) if (!s.write(buf)) return void s.once('drain', pump)
          s.end()
        }
        pump()
      })
      s.on('error', reject)
      s.on('close', resolve)
    })
    await Promise.race([exited, new Promise((r) => setTimeout(r, 10_000))])
    const line = out.split('\n').find((l) => l.startsWith('{'))
    if (!line) throw new Error(`tcp sink gave no result: ${err.trim()}`)
    const { bytes, samples } = JSON.parse(line)
    const from = samples.find(([t]) => t >= skipMs) ?? [0, 0]
    const to = samples[samples.length - 1]
    const mibPerSec = to[0] > from[0] ? (to[1] - from[1]) / (1 << 20) / ((to[0] - from[0]) / 1000) : NaN
    return { mibPerSec, bytes, ms: to[0] }
  } finally {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL')
  }
}

if (process.argv[1] === self && process.argv[2] === 'sink') sink(process.argv[3] ?? '127.0.0.1')
