/**
 * A scripted source speaking raw frames to a real destination engine (fake
 * binding, in-memory transports): drives it to a phase, then feeds it one
 * frame and reports what the destination made of it.
 */
import { PageBitmap } from '../../../src/bitmap'
import type { Clock } from '../../../src/agent/clock'
import { MigrationDestination } from '../../../src/agent/destination/index'
import { DestPhase } from '../../../src/agent/destination/machine'
import type { UffdMigrateError } from '../../../src/errors'
import { Channel } from '../../../src/protocol/channel'
import { clientHandshake, peerError } from '../../../src/protocol/handshake'
import { encodeControl, encodeRuns, Msg, RangeKind } from '../../../src/protocol/messages'
import { Region } from '../../../src/region'
import { FakeBinding } from '../../../src/testing/fake-binding'
import { MemoryTransport } from '../../../src/testing/memory-transport'
import { PS, TOKEN } from './wire'

export const REACHABLE = [DestPhase.LISTENING, DestPhase.PRECOPY, DestPhase.POSTCOPY, DestPhase.RECOVERING, DestPhase.SETTLED] as const

export interface Driven {
  dest: MigrationDestination
  /** ERROR frames the destination sent back, per channel. */
  errors: { urgent: UffdMigrateError[]; bulk: UffdMigrateError[] }
  urgent: Channel
  bulk: Channel
  failure: Promise<UffdMigrateError>
  events: string[]
  /** The destination's recovery lines (why the link broke), in order. */
  recoveryLines: string[]
  binding: FakeBinding
  region: Region
  /** Source ends of every transport opened, newest last. */
  links: MemoryTransport[]
}

const PAGES = 8
export const turns = async (n = 5) => {
  for (let i = 0; i < n; i++) await new Promise((r) => setImmediate(r))
}

export async function open(dest: MigrationDestination, role: 'urgent' | 'bulk', session: string, links: MemoryTransport[]): Promise<Channel> {
  const [a, b] = MemoryTransport.pair()
  links.push(a)
  void dest.accept(b)
  const ch = new Channel(a, role)
  await clientHandshake(ch, TOKEN, { role, session })
  return ch
}

/** A destination with one region of 8 pages, driven to `phase` by a raw source. */
export async function drive(phase: DestPhase, opts: { clock?: Clock; regions?: Record<string, unknown> } = {}): Promise<Driven> {
  const binding = new FakeBinding(PS)
  const region = Region.create('r', PAGES * PS, binding)
  const events: string[] = [], recoveryLines: string[] = []
  let fail!: (e: UffdMigrateError) => void
  const failure = new Promise<UffdMigrateError>((r) => (fail = r))
  const dest = new MigrationDestination(binding, [region], [new PageBitmap(PAGES)], { token: TOKEN, bulkBufferBytes: 0, clock: opts.clock }, {
    restore: async () => 1,
    settled: () => events.push('settled'),
    ready: () => {},
    failed: (e) => fail(e as UffdMigrateError),
    recovering: (line) => void (events.push('recovering'), recoveryLines.push(line)),
    refused: (m) => events.push(`refused: ${m}`),
    sessionEnded: (e) => events.push(`ended: ${(e as UffdMigrateError).code}`),
  })
  const links: MemoryTransport[] = []
  const session = 'raw-session'
  let urgent = await open(dest, 'urgent', session, links)
  let bulk = await open(dest, 'bulk', session, links)
  if (phase !== DestPhase.LISTENING) {
    bulk.send(encodeControl(Msg.REGIONS, { pageSize: PS, regions: [{ name: 'r', sizeBytes: PAGES * PS }], linkTimeoutMs: 0, ...opts.regions }))
    const ok = await bulk.nextFrame()
    if (ok.type !== Msg.REGIONS_OK) throw new Error(`expected REGIONS_OK, got ${ok.type}`)
  }
  if (phase === DestPhase.SETTLED) bulk.send(encodeRuns(Msg.RANGES, RangeKind.ZERO, 0, [0, PAGES]))
  if (phase === DestPhase.POSTCOPY || phase === DestPhase.RECOVERING || phase === DestPhase.SETTLED) {
    bulk.send(encodeControl(Msg.HANDOFF, { state: new Uint8Array(0), discard: [new Uint8Array(0)], recoveryTimeoutMs: 60_000 }))
    await turns()
  }
  if (phase === DestPhase.RECOVERING) {
    links.at(-1)!.cut()
    await turns()
    urgent = await open(dest, 'urgent', session, links)
    bulk = await open(dest, 'bulk', session, links)
  }
  await turns()
  const errors = { urgent: [] as UffdMigrateError[], bulk: [] as UffdMigrateError[] }
  urgent.onFrame((f) => void (f.type === Msg.ERROR && errors.urgent.push(peerError(f.payload))))
  bulk.onFrame((f) => void (f.type === Msg.ERROR && errors.bulk.push(peerError(f.payload))))
  return { dest, urgent, bulk, failure, events, recoveryLines, errors, binding, region, links }
}

/**
 * Sends one frame of `type` (an empty control map as its body); the error the
 * destination answered with (an ERROR frame on that channel), if any.
 */
export async function sendRaw(d: Driven, ch: 'urgent' | 'bulk', type: number): Promise<UffdMigrateError | undefined> {
  d[ch].send(encodeControl(type as Msg, {}))
  await turns()
  return d.errors[ch][0]
}
