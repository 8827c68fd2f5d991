// Extra bulk streams against a real destination engine (the addon's readers, loopback TCP): a stream joins only its
// session, only in pre-copy, and no more than REGIONS_OK granted. After the hand-off a stream's reader would place
// pages by pre-copy's rules (written over in place, dropped) under a running service, and the hand-off, which
// retires the streams, would never retire it. The pure tier (test/unit/hostile.test.ts) has no native reader, so no
// stream is ever granted there and only the count rule shows.
import { describe, expect, it } from 'vitest'
import { MigrationDestination } from '../src/agent/destination/index'
import { DestPhase } from '../src/agent/destination/machine'
import { loadBinding } from '../src/binding'
import { PageBitmap } from '../src/bitmap'
import { encodeControl, Msg } from '../src/protocol/messages'
import { Region } from '../src/region'
import { FUZZ_TOKEN, FuzzLink } from '../src/testing/fuzz/link'
import { createWire } from '../src/testing/fuzz/wire'
import { kernelSkipReason } from './helpers/gate'
import { pollUntil } from './helpers/wait'

const skip = kernelSkipReason()
const PAGES = 16

describe.skipIf(skip)('extra bulk streams join only in pre-copy, and only as many as granted', () => {
  it('one stream before the hand-off; after it, one more (within the grant) is refused as busy and the session goes on', async () => {
    const b = loadBinding()
    const ps = b.pageSize
    const regions = [Region.create('r0', PAGES * ps, b)]
    const refused: string[] = []
    const dest = new MigrationDestination(b, regions, [new PageBitmap(PAGES)], { token: FUZZ_TOKEN, bulkBufferBytes: 0 }, {
      restore: async () => Date.now(), settled: () => {}, ready: () => {}, failed: () => {}, refused: (m) => refused.push(m), sessionEnded: () => {},
    })
    const wire = createWire('tcp')
    try {
      const link = await FuzzLink.open(wire, dest, 'admission-1', false)
      // three streams asked (bulk and two extra): two granted
      link.writeOn('bulk', Buffer.concat(encodeControl(Msg.REGIONS, { linkTimeoutMs: 10_000, pageSize: ps, streams: 3, regions: [{ name: 'r0', sizeBytes: PAGES * ps }] })))
      expect(await link.openStream()).toBe(true)
      expect(link.streamsGranted).toBe(3)
      link.writeOn('bulk', Buffer.concat(encodeControl(Msg.PRECOPY_END, {})))
      link.writeOn('bulk', Buffer.concat(encodeControl(Msg.HANDOFF, { state: new Uint8Array([1]), discard: [Buffer.alloc(0)], recoveryTimeoutMs: 60_000 })))
      expect(await pollUntil(() => dest.phase === DestPhase.POSTCOPY, 5000)).toBe(true)
      // the second extra stream the grant allows, now after the hand-off
      expect(await link.openStream()).toBe(false)
      expect(refused.at(-1)).toMatch(/ERR_MIGRATION_BUSY/)
      expect(dest.phase).toBe(DestPhase.POSTCOPY)
    } finally {
      dest.close()
      wire.close()
      for (const r of regions) r.release()
    }
  })
})
if (skip) console.warn(`stream-admission.test: skipped: ${skip}`)
