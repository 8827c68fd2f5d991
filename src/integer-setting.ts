/**
 * One integer setting: the caller's value (an option, or a CLI flag's
 * string), else its environment variable, else the default; anything that is
 * not an integer in range is ERR_INVALID_ARG naming where it came from.
 */
import { ErrorCode, UffdMigrateError } from './errors'

export interface IntegerSetting {
  /** What the caller passed (undefined: not given). */
  explicit?: number | string
  /** The caller's name for it (options.agentNice, --agent-nice). */
  name: string
  /** Its environment variable. */
  env: string
  fallback: number
  min: number
  max: number
  /** What a good value is, for the error: "an integer nice value from 0 to 19". */
  what: string
}

export function resolveIntegerSetting(s: IntegerSetting, environment: NodeJS.ProcessEnv = process.env): number {
  const raw = s.explicit ?? environment[s.env] ?? s.fallback
  const n = typeof raw === 'string' && raw.trim() !== '' ? Number(raw) : raw
  if (typeof n !== 'number' || !Number.isInteger(n) || n < s.min || n > s.max) {
    const from = s.explicit !== undefined ? s.name : s.env
    throw new UffdMigrateError(`expected ${from} to be ${s.what}, got ${typeof n === 'number' && !Number.isNaN(n) ? n : JSON.stringify(raw)}`, ErrorCode.INVALID_ARG)
  }
  return n
}
