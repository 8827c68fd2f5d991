/**
 * The operator's log: one line on the service's stderr at each turn of a migration (src/agent/log-lines.ts says
 * what), written with a plain write(2): the agent's thread writes most of them, and a worker's process.stderr goes
 * through the service's thread, which may be blocked in a fault just when a line matters.
 *
 * Text by default (`uffd-migrate: guest 'NAME': ...`). With UFFD_MIGRATE_LOG_FORMAT=json each line is one JSON
 * object for a log pipeline: {time, level, guest, pid, migration, event, msg}; `event` is a stable name to alert on
 * (the README's Troubleshooting lists them), `msg` the text line's words, `migration` the id both hosts log for one
 * migration (its session: on the lines about it; a try sent again is another migration).
 */
import fs from 'node:fs'

/** Every event a line can carry (stable: alerts and dashboards key on them). */
export const LOG_EVENTS = [
  // the destination
  'listening', 'incoming', 'resumed', 'settled', 'refused', 'session-ended', 'handoff-refused',
  // either side: a preflight (send --dry-run) passed or, at the source, failed
  'preflight',
  // the source
  'migration-began', 'bandwidth-changed', 'handed-off', 'moved', 'migration-cancelled', 'agent-takeover', 'forwarded-exit',
  // either side
  'link-broken', 'link-back', 'migration-failed', 'agent-crashed', 'exiting', 'still-yielding', 'no-control-socket',
  // the source, after the hand-off
  'signal-held',
] as const
export type LogEvent = (typeof LOG_EVENTS)[number]
export type LogLevel = 'info' | 'warn' | 'error'
export type LogFormat = 'text' | 'json'

/** The format the environment asks for (anything but 'json' is text). */
export function logFormat(env: NodeJS.ProcessEnv = process.env): LogFormat {
  return env.UFFD_MIGRATE_LOG_FORMAT === 'json' ? 'json' : 'text'
}

/** One line, newline included. `at` null: no time (a line composed now and written later, by a native thread). */
export function formatLog(format: LogFormat, guest: string, event: LogEvent, msg: string, level: LogLevel, at: Date | null = new Date(), pid = process.pid, migration?: string): string {
  if (format === 'text') return `uffd-migrate: guest '${guest}': ${msg}\n`
  return `${JSON.stringify({ ...(at ? { time: at.toISOString() } : {}), level, guest, pid, ...(migration ? { migration } : {}), event, msg })}\n`
}

const format = logFormat()

/** Writes one line to stderr now (stderr closed: nobody to tell); migration: the id of the migration it is about. */
export function logLine(guest: string, event: LogEvent, msg: string, level: LogLevel = 'info', migration?: string): void {
  try {
    fs.writeSync(2, formatLog(format, guest, event, msg, level, new Date(), process.pid, migration))
  } catch {
    // stderr closed
  }
}

/** The line a native thread writes later, as it ends the process (no time: it is composed now). */
export function deferredLogLine(guest: string, event: LogEvent, msg: string, level: LogLevel, migration?: string): string {
  return formatLog(format, guest, event, msg, level, null, process.pid, migration)
}
