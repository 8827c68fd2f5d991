// The same counter service as an ES module (top-level await).
import http from 'node:http'
import { Guest } from 'uffd-migrate'

const guest = await Guest.start({
  name: process.env.GUEST_NAME || 'counter',
  regions: { counts: 64 << 20 },
  pause: () => ({ hits }),
})
const counts = new Uint32Array(guest.regions.counts.buffer)
let hits = guest.restored ? guest.state.hits : 0
const server = http.createServer((req, res) => {
  const slot = Number(new URL(req.url, 'http://x').searchParams.get('slot') || 0) % counts.length
  counts[slot]++
  hits++
  res.end(JSON.stringify({ slot, count: counts[slot], hits }) + '\n')
})
server.listen(Number(process.env.PORT || 8080))
guest.serve(server)
