/**
 * Mutations of the sealed record layer, for the fuzzer's encrypted sessions:
 * what someone on the path (who has no key) can do to records after the
 * handshake. Each takes the records one frame was sealed into (and, for a
 * swap, the next frame's) and sends something else. The destination must
 * refuse every one with a code (a failed tag, or bytes that are not a
 * record) and use nothing of the record touched or after it.
 */
import { SEALED, type Sealer } from '../../protocol/records'

export const RECORD_MUTATIONS = ['recordBitflip', 'recordReplay', 'recordDrop', 'recordSwap', 'recordUnsealed'] as const
export type RecordMutation = (typeof RECORD_MUTATIONS)[number]

export function isRecordMutation(kind: string): kind is RecordMutation {
  return (RECORD_MUTATIONS as readonly string[]).includes(kind)
}

/** bytes sealed as whole records, one Buffer each (a frame over 256 KiB of plaintext takes several). */
function sealRecords(sealer: Sealer, bytes: Buffer): Buffer[] {
  const all = Buffer.concat(sealer.seal([bytes]))
  const out: Buffer[] = []
  for (let at = 0; at < all.length; ) {
    const len = 4 + all.readUInt32BE(at)
    if (all[at + 4] !== SEALED) throw new Error('fuzzer: the sealer wrote something other than a record')
    out.push(all.subarray(at, at + len))
    at += len
  }
  return out
}

/**
 * What goes on the wire instead of `frame` (plaintext, one frame) sealed:
 * `next` is the next valid frame of the script, if any (its records are
 * sealed after this one's, so a swap sends them first).
 */
export function mutateRecords(sealer: Sealer, frame: Buffer, next: Buffer | undefined, kind: RecordMutation, rand: () => number): Buffer[] {
  const int = (n: number) => Math.floor(rand() * n)
  if (kind === 'recordUnsealed') return [frame] // a plaintext frame where a record is due
  const records = sealRecords(sealer, frame)
  switch (kind) {
    case 'recordBitflip': {
      // anywhere: its length (a record that lies about its size), its type, the ciphertext, the tag
      const i = int(records.length)
      const b = Buffer.from(records[i])
      for (let k = 1 + int(4); k > 0; k--) b[int(b.length)] ^= 1 << int(8)
      return [...records.slice(0, i), b, ...records.slice(i + 1)]
    }
    case 'recordReplay':
      return [...records, records[int(records.length)]]
    case 'recordDrop': {
      const i = int(records.length)
      return [...records.slice(0, i), ...records.slice(i + 1)]
    }
    case 'recordSwap': {
      if (!next) return records.slice(1) // the last frame: nothing to swap with, so its first record goes missing
      return [...sealRecords(sealer, next), ...records]
    }
  }
}
