/**
 * The fuzz loop: sessions from a seed until `frames` frames went out, each
 * with one mutated frame at a random point (the handshake included), and the
 * table of outcomes. Deterministic for a seed (fake clock, seeded choices)
 * over the in-memory wire; over TCP the addon's threads take part, and
 * scheduling can change a session's outcome, never what is checked (wire.ts).
 */
import type { NativeBinding } from '../../binding'
import { prng } from '../prng'
import { type Mutation, MUTATIONS } from './mutate'
import { RECORD_MUTATIONS, type RecordMutation } from './records'
import { FuzzSession } from './session'
import { SourceFuzzSession } from './source-session'
import type { WireKind } from './wire'

/** Which engine is fuzzed: the destination (the fuzzer plays a source) or the source (it plays a destination). */
export type FuzzSide = 'destination' | 'source'
export const FUZZ_SIDES: readonly FuzzSide[] = ['destination', 'source']

type Kind = Mutation | RecordMutation
/** The share of sessions that are sealed (encrypted): the record layer's mutations are drawn only in those. */
const SEALED_SHARE = 1 / 3

export interface FuzzRow {
  sessions: number
  /** Of them, sealed (encrypted) sessions. */
  sealed: number
  rejected: number
  accepted: number
  ends: Record<string, number>
  codes: Record<string, number>
  hangs: number
  badPages: number
  /** Rejections without an ERR_ code. */
  uncoded: number
  crashes: number
  /** The source side: sessions after which the service ran on both hosts, or neither, or resumed twice. */
  serviceFaults: number
  /** The source side: PAGES it sent outside its regions or with bytes its memory never held. */
  strayPages: number
}

export interface FuzzReport {
  seed: number
  side: FuzzSide
  wire: WireKind
  frames: number
  sessions: number
  rows: Record<Kind, FuzzRow>
  totals: FuzzRow
  /** Settled sessions by who read their bulk connection, as the destination reported it (native: the addon's reader). */
  bulkReceive: Record<string, number>
  /** Sessions that opened an extra bulk stream (over TCP). */
  withStream: number
  /** The source side: sessions whose agent crashed after the hand-off, a new one taking over. */
  tookOver: number
  /**
   * The source side: how the sessions whose mutated unit was a sealed record (what a path without the keys can do)
   * ended, with their code ('kept CONNECTION': failed after the hand-off, the source's memory kept).
   */
  recordOutcomes: Record<string, number>
  /** The source side: sessions by the destination's message that was mutated ('record': sealed; the rest never met it). */
  mutatedTypes: Record<string, number>
  /** Sessions that ended after the hand-off (the destination failed; the source kept its memory), by the type mutated. */
  endedAfterHandoffBy: Record<string, number>
  /** The first few failures, to reproduce: seed, session, mutation, point, what. */
  failures: string[]
  elapsedMs: number
}

const emptyRow = (): FuzzRow => ({ sessions: 0, sealed: 0, rejected: 0, accepted: 0, ends: {}, codes: {}, hangs: 0, badPages: 0, uncoded: 0, crashes: 0, serviceFaults: 0, strayPages: 0 })

/** A session's failures (what the table counts as such). */
export function failureCount(t: FuzzRow): number {
  return t.crashes + t.hangs + t.badPages + t.uncoded + t.serviceFaults + t.strayPages
}

export async function runFuzz(opts: { binding: NativeBinding; frames: number; seed: number; wire?: WireKind; side?: FuzzSide; onProgress?: (r: FuzzReport) => void }): Promise<FuzzReport> {
  const wire = opts.wire ?? 'memory', side = opts.side ?? 'destination'
  const t0 = performance.now()
  const rand = prng(opts.seed)
  const rows = Object.fromEntries([...MUTATIONS, ...RECORD_MUTATIONS].map((m) => [m, emptyRow()])) as Record<Kind, FuzzRow>
  const report: FuzzReport = { seed: opts.seed, side, wire, frames: 0, sessions: 0, rows, totals: emptyRow(), bulkReceive: {}, withStream: 0, tookOver: 0, recordOutcomes: {}, mutatedTypes: {}, endedAfterHandoffBy: {}, failures: [], elapsedMs: 0 }
  let lastProgress = t0
  while (report.frames < opts.frames) {
    const sealed = rand() < SEALED_SHARE
    // (the record layer's mutations re-seal with the source's keys: a destination's records are mutated as units)
    const kinds: readonly Kind[] = sealed && side === 'destination' ? [...MUTATIONS, ...RECORD_MUTATIONS] : MUTATIONS
    const kind = kinds[Math.floor(rand() * kinds.length)]
    const sessionSeed = Math.floor(rand() * 2 ** 31)
    const session = side === 'source' ? new SourceFuzzSession(opts.binding, prng(sessionSeed), sessionSeed, sealed, wire) : new FuzzSession(opts.binding, prng(sessionSeed), sessionSeed, sealed, wire)
    const at = Math.floor(rand() * (session.frameCount + 1)) - 1 // -1: the handshake
    const row = rows[kind]
    row.sessions++
    if (sealed) row.sealed++
    report.sessions++
    const fail = (what: string) => {
      if (report.failures.length < 20) report.failures.push(`seed ${opts.seed} (${side} side, ${wire}) session ${report.sessions} (session seed ${sessionSeed}${sealed ? ', sealed' : ''}): ${kind} at frame ${at}: ${what}`)
    }
    try {
      // (a source session draws no record mutation: see kinds)
      const r = session instanceof SourceFuzzSession ? await session.run(at, kind as Mutation) : await session.run(at, kind)
      report.frames += r.frames
      if (r.rejected) row.rejected++
      else row.accepted++
      row.ends[r.end] = (row.ends[r.end] ?? 0) + 1
      if (r.bulkReceive) report.bulkReceive[r.bulkReceive] = (report.bulkReceive[r.bulkReceive] ?? 0) + 1
      if (r.stream) report.withStream++
      if (r.tookOver) report.tookOver++
      const type = r.mutatedType ?? 'none'
      report.mutatedTypes[type] = (report.mutatedTypes[type] ?? 0) + 1
      if (r.end === (side === 'source' ? 'kept' : 'failed')) report.endedAfterHandoffBy[type] = (report.endedAfterHandoffBy[type] ?? 0) + 1
      if (r.mutatedRecord) {
        const outcome = [r.end, ...r.codes.map((c) => c.replace(/^ERR_MIGRATION_/, ''))].join(' ')
        report.recordOutcomes[outcome] = (report.recordOutcomes[outcome] ?? 0) + 1
      }
      for (const c of r.codes) {
        row.codes[c] = (row.codes[c] ?? 0) + 1
        if (!/^ERR_[A-Z_]+$/.test(c)) {
          row.uncoded++
          fail(`a rejection without an ERR_ code: ${c}`)
        }
      }
      if (r.hang) {
        row.hangs++
        fail(`hang: ${r.hang}`)
      }
      if (r.badPages) {
        row.badPages += r.badPages
        fail(`${r.badPages} pages wrong after the session (end: ${r.end})`)
      }
      if (r.serviceFault) {
        row.serviceFaults++
        fail(`${r.serviceFault} (end: ${r.end})`)
      }
      if (r.stray?.length) {
        row.strayPages += r.stray.length
        fail(`the source sent ${r.stray.length} stray PAGES: ${r.stray[0]}`)
      }
    } catch (err) {
      row.crashes++
      fail(`crash: ${(err as Error).stack ?? err}`)
    } finally {
      try {
        session.close()
      } catch (err) {
        // (an engine that throws as it closes is a crash too, with the session that made it)
        row.crashes++
        fail(`crash as the session closed: ${(err as Error).stack ?? err}`)
      }
    }
    if (opts.onProgress && performance.now() - lastProgress > 2000) {
      lastProgress = performance.now()
      opts.onProgress(report)
    }
  }
  for (const row of Object.values(rows)) {
    const t = report.totals
    for (const k of ['sessions', 'sealed', 'rejected', 'accepted', 'hangs', 'badPages', 'uncoded', 'crashes', 'serviceFaults', 'strayPages'] as const) t[k] += row[k]
    for (const [k, v] of Object.entries(row.ends)) t.ends[k] = (t.ends[k] ?? 0) + v
    for (const [k, v] of Object.entries(row.codes)) t.codes[k] = (t.codes[k] ?? 0) + v
  }
  report.elapsedMs = performance.now() - t0
  return report
}

/** The outcome table (markdown). */
export function fuzzTable(r: FuzzReport): string {
  const short = (c: string) => c.replace(/^ERR_MIGRATION_/, '').replace(/^ERR_/, '')
  const fmt = (o: Record<string, number>) => Object.entries(o).sort((a, b) => b[1] - a[1]).map(([k, v]) => `${short(k)} ${v}`).join(', ') || '-'
  const lines = [
    r.side === 'source'
      ? `fuzz: the source's engine (the fuzzer plays the destination), seed ${r.seed}, ${r.wire} wire, ${r.frames} destination frames in ${r.sessions} sessions, ${(r.elapsedMs / 1000).toFixed(1)} s; a new agent took over after a crash in ${r.tookOver}; a sealed record mutated, the session ended: ${fmt(r.recordOutcomes)}`
      : `fuzz: seed ${r.seed}, ${r.wire} wire, ${r.frames} frames in ${r.sessions} sessions, ${(r.elapsedMs / 1000).toFixed(1)} s; bulk read by: ${fmt(r.bulkReceive)}; an extra stream in ${r.withStream}`,
    '',
    '| mutation | sessions | sealed | rejected | accepted | crashes | hangs | bad pages | uncoded | service faults | stray pages | codes | session ended |',
    '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|',
  ]
  const row = (name: string, x: FuzzRow) =>
    `| ${name} | ${x.sessions} | ${x.sealed} | ${x.rejected} | ${x.accepted} | ${x.crashes} | ${x.hangs} | ${x.badPages} | ${x.uncoded} | ${x.serviceFaults} | ${x.strayPages} | ${fmt(x.codes)} | ${fmt(x.ends)} |`
  for (const [name, x] of Object.entries(r.rows)) lines.push(row(name, x))
  lines.push(row('**all**', r.totals))
  lines.push('', `the ${r.side === 'source' ? 'destination' : 'source'}'s messages mutated, by sessions: ${fmt(r.mutatedTypes)}`)
  lines.push(`ended after the hand-off (${r.side === 'source' ? 'the source kept its memory' : 'the destination failed'}), by the message mutated: ${fmt(r.endedAfterHandoffBy)}`)
  if (r.failures.length) lines.push('', 'failures:', ...r.failures.map((f) => `- ${f}`))
  return lines.join('\n')
}
