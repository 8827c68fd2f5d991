/**
 * docs/protocol.md's state tables, rendered from the code's tables: the
 * transitions and the message rules of each side. `npm run docs:protocol`
 * writes them into the document; a unit test fails when the two differ.
 */
import { DEST_MESSAGES, DEST_TRANSITIONS } from './destination/machine'
import { type MessageTable, msgName } from './message-table'
import { FATE_TRANSITIONS } from './source/handoff-fate'
import { SOURCE_MESSAGES, SOURCE_TRANSITIONS } from './source/machine'
import type { TransitionTable } from './state-machine'

export const TABLES_BEGIN = '<!-- state tables: generated from src/agent/*/machine.ts by `npm run docs:protocol`; do not edit -->'
export const TABLES_END = '<!-- end of state tables -->'

function transitions<P extends string>(t: TransitionTable<P>, what = 'phase'): string {
  const rows = (Object.keys(t) as P[]).map((p) => `| ${p} | ${t[p].length ? t[p].join(', ') : '(final)'} |`)
  return [`| ${what} | may go to |`, '|---|---|', ...rows].join('\n')
}

function messages<P extends string, C>(t: MessageTable<P, C>, phases: TransitionTable<P>): string {
  const all = Object.keys(phases).length
  const rows = Object.keys(t).map(Number).sort((a, b) => a - b).map((type) => {
    const r = t[type]!
    const where = (['bulk', 'urgent'] as const).map((ch) => (r.on[ch] ? `${ch}: ${r.on[ch]!.length === all ? 'any phase' : r.on[ch]!.join(', ')}` : '')).filter(Boolean).join('; ')
    return `| ${type} ${msgName(type)} | ${where} | ${r.note} |`
  })
  return ['| message | legal on (channel: phases) | effect |', '|---|---|---|', ...rows].join('\n')
}

export function renderProtocolTables(): string {
  return [
    TABLES_BEGIN,
    '### Source: phases',
    transitions(SOURCE_TRANSITIONS),
    '',
    '### Source: where the service runs (the hand-off\'s fate, src/agent/source/handoff-fate.ts)',
    transitions(FATE_TRANSITIONS, 'fate'),
    '',
    '### Source: messages it accepts',
    messages(SOURCE_MESSAGES, SOURCE_TRANSITIONS),
    '',
    '### Destination: phases',
    transitions(DEST_TRANSITIONS),
    '',
    '### Destination: messages it accepts',
    messages(DEST_MESSAGES, DEST_TRANSITIONS),
    '',
    'Any other message, or one outside the phases and channel listed, is `ERR_MIGRATION_PROTOCOL`; a step the',
    'transition table does not list is `ERR_AGENT` (a bug, never the peer\'s doing).',
    TABLES_END,
  ].join('\n')
}
