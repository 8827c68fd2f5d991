'use strict'
// The content of page p at version v: 16 words spread over the page. Version 0
// is a page never written: all zeros. Cheap to write, cheap to check.
const WORDS = 16
const STRIDE = 256 / 4 // u32 index stride: one word every 256 bytes

function word(p, v, k) {
  let x = (Math.imul(p + 1, 0x9e3779b1) ^ Math.imul(v, 0x85ebca6b) ^ Math.imul(k + 1, 0xc2b2ae35)) >>> 0
  x ^= x >>> 15
  return (Math.imul(x, 0x2c1b3c6d) | 1) >>> 0
}

/** Writes version v of page p (u32 view of the region, page size in u32 words). */
function writePage(u32, p, v, pageWords) {
  const base = p * pageWords
  for (let k = 0; k < WORDS; k++) u32[base + k * STRIDE] = word(p, v, k)
}

/** True when page p holds exactly version v. */
function checkPage(u32, p, v, pageWords) {
  const base = p * pageWords
  for (let k = 0; k < WORDS; k++) if (u32[base + k * STRIDE] !== (v === 0 ? 0 : word(p, v, k))) return false
  return true
}

module.exports = { writePage, checkPage }
