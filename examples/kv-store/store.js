'use strict'
// A key-value store in two guest regions.
//   table: open-addressing hash table, 32-byte slots:
//          u32 hash | u32 slab | u32 offset | u32 length | u32 version | u8 keyLen | 11 bytes key
//   arena: 64 KiB slabs, values bump-allocated in the current slab; a slab
//          whose values are all gone goes on the free list and is reported to
//          uffd-migrate with region.free(), so it never crosses the network.
const SLOT = 32
const SLAB = 64 * 1024
const TABLE_PAGE = 4096
const KEY_MAX = 11

function hash(key) {
  let h = 0x811c9dc5
  for (let i = 0; i < key.length; i++) h = Math.imul(h ^ key.charCodeAt(i), 0x01000193)
  return (h | 1) >>> 0 // 0 marks an empty slot
}

class Store {
  constructor(table, arena, state) {
    this.table = table // GuestRegion
    this.arena = arena
    this.slots = table.sizeBytes / SLOT
    this.t32 = new Uint32Array(table.buffer)
    this.t8 = new Uint8Array(table.buffer)
    this.a8 = new Uint8Array(arena.buffer)
    this.slabs = arena.sizeBytes / SLAB
    // allocator state: small, crosses at the hand-off
    this.live = state ? new Uint32Array(state.live.buffer.slice(state.live.byteOffset, state.live.byteOffset + state.live.byteLength)) : new Uint32Array(this.slabs)
    this.freeList = state ? state.freeList : []
    this.current = state ? state.current : 0
    this.bump = state ? state.bump : 0
    this.nextFresh = state ? state.nextFresh : 1
    this.freedSlabs = state ? state.freedSlabs : 0
  }

  state() {
    return { live: Buffer.from(this.live.buffer), freeList: this.freeList, current: this.current, bump: this.bump, nextFresh: this.nextFresh, freedSlabs: this.freedSlabs }
  }

  /** Slot index holding key, or the empty slot where it would go. Touches table pages. */
  find(key) {
    const h = hash(key)
    for (let i = h % this.slots, n = 0; n < this.slots; i = (i + 1) % this.slots, n++) {
      const w = (i * SLOT) / 4
      const sh = this.t32[w]
      if (sh === 0) return { slot: i, found: false, h }
      if (sh === h && this.keyAt(i) === key) return { slot: i, found: true, h }
    }
    throw new Error('table full')
  }

  keyAt(i) {
    const b = i * SLOT + 20
    const n = this.t8[b]
    let s = ''
    for (let k = 0; k < n; k++) s += String.fromCharCode(this.t8[b + 1 + k])
    return s
  }

  /** The 4 KiB table page of key's home slot: its probe chain starts there (for ready()). */
  homePage(key) {
    return Math.floor(((hash(key) % this.slots) * SLOT) / TABLE_PAGE)
  }

  /**
   * Whether key's probe chain, read on table page `page`, meets an empty slot there: a lookup and a delete's
   * backward shift read the chain up to its first empty slot, never further. Reads that page only.
   */
  chainEndsOnPage(key, page) {
    const home = hash(key) % this.slots
    const perPage = TABLE_PAGE / SLOT
    const first = Math.floor(home / perPage) === page ? home : page * perPage
    for (let i = first; i < Math.min((page + 1) * perPage, this.slots); i++) if (this.t32[(i * SLOT) / 4] === 0) return true
    return false
  }

  valueRange(slot) {
    const w = (slot * SLOT) / 4
    return [this.t32[w + 1] * SLAB + this.t32[w + 2], this.t32[w + 3]]
  }

  get(key) {
    const { slot, found } = this.find(key)
    if (!found) return undefined
    const [off, len] = this.valueRange(slot)
    return Buffer.from(this.a8.subarray(off, off + len)).toString('latin1')
  }

  /** Version of a live key (the writer's), or 0. */
  version(key) {
    const { slot, found } = this.find(key)
    return found ? this.t32[(slot * SLOT) / 4 + 4] : 0
  }

  put(key, value, version) {
    if (key.length > KEY_MAX) throw new Error(`keys are at most ${KEY_MAX} bytes`)
    const bytes = Buffer.from(value, 'latin1')
    if (bytes.length > SLAB) throw new Error('value too large')
    const { slot, found, h } = this.find(key)
    const w = (slot * SLOT) / 4
    if (found) this.release(this.t32[w + 1], this.t32[w + 3])
    const [slab, off] = this.alloc(bytes.length)
    this.a8.set(bytes, slab * SLAB + off)
    this.t32[w] = h
    this.t32[w + 1] = slab
    this.t32[w + 2] = off
    this.t32[w + 3] = bytes.length
    this.t32[w + 4] = version
    this.t8[slot * SLOT + 20] = key.length
    for (let k = 0; k < key.length; k++) this.t8[slot * SLOT + 21 + k] = key.charCodeAt(k)
  }

  delete(key) {
    const { slot, found } = this.find(key)
    if (!found) return false
    const w = (slot * SLOT) / 4
    this.release(this.t32[w + 1], this.t32[w + 3])
    // Backward-shift deletion keeps probe chains intact: walk the cluster to
    // its end; an entry whose home lies cyclically in (hole, j] stays, any
    // other moves into the hole (an entry at its home does not end the walk:
    // entries after it may still probe across the hole).
    let i = slot
    for (let j = (slot + 1) % this.slots; ; j = (j + 1) % this.slots) {
      const sh = this.t32[(j * SLOT) / 4]
      if (sh === 0) break
      const home = sh % this.slots
      const stays = i <= j ? i < home && home <= j : i < home || home <= j
      if (stays) continue
      this.t8.copyWithin(i * SLOT, j * SLOT, j * SLOT + SLOT)
      i = j
    }
    this.t8.fill(0, i * SLOT, i * SLOT + SLOT)
    return true
  }

  alloc(len) {
    if (this.bump + len > SLAB) {
      this.current = this.freeList.length ? this.freeList.pop() : this.nextFresh++
      if (this.current >= this.slabs) throw new Error('arena full')
      this.bump = 0
    }
    const off = this.bump
    this.bump += (len + 15) & ~15
    this.live[this.current] += len
    return [this.current, off]
  }

  release(slab, len) {
    this.live[slab] -= len
    if (this.live[slab] === 0 && slab !== this.current) {
      this.freeList.push(slab)
      this.freedSlabs++
      this.arena.free(slab * SLAB, SLAB) // ballooning: this slab's pages never travel
    }
  }
}

/** The value the clients write for (key, version): deterministic, checkable. */
function valueFor(key, version) {
  const len = 64 + ((hash(key) ^ Math.imul(version, 2654435761)) >>> 0) % 6000
  const unit = `${key}:${version};`
  return unit.repeat(Math.ceil(len / unit.length)).slice(0, len)
}

module.exports = { Store, valueFor, SLAB }
