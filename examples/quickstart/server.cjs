// A counter service whose state lives in a guest region (CommonJS).
//   PORT=8080 node server.cjs                                    (the first host)
//   uffd-migrate receive --listen 0.0.0.0:7070 -- node server.cjs (the next host)
'use strict'
const http = require('node:http')
const { Guest } = require('uffd-migrate')

async function main() {
  const guest = await Guest.start({
    name: process.env.GUEST_NAME || 'counter', // names the control socket for the CLI
    regions: { counts: 64 << 20 }, // bytes, rounded up to pages
    // hand-off: stop changing the regions, return the small state (msgpackr); requests wait meanwhile
    pause: () => ({ hits }),
  })
  const counts = new Uint32Array(guest.regions.counts.buffer)
  let hits = guest.restored ? guest.state.hits : 0 // on the next host: the state pause() returned
  const server = http.createServer((req, res) => {
    const slot = Number(new URL(req.url, 'http://x').searchParams.get('slot') || 0) % counts.length
    counts[slot]++
    hits++
    res.end(JSON.stringify({ slot, count: counts[slot], hits }) + '\n')
  })
  server.listen(Number(process.env.PORT || 8080))
  // this address keeps working across a migration: clients wait, then are relayed to the next host
  guest.serve(server)
}

main().catch((err) => {
  console.error(`counter: ${err.message} [${err.code}]`)
  process.exit(1)
})
