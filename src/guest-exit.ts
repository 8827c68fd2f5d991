/**
 * How a guest's process ends after a migration, unless the service said it handles it (a listener of its own, or
 * exitOnMoved false): moved away (exit 0, once its forwarded clients went quiet), or failed past the hand-off
 * (exit 4, EXIT_MOVE_FAILED, for its supervisor).
 */
import type { EventEmitter } from 'node:events'
import { loadBinding } from './binding'
import { EXIT_MOVE_FAILED } from './errors'
import type { Forwarder } from './forwarder'
import { logLine } from './log'

interface EndingGuest extends EventEmitter {
  readonly name: string
  /** The migration that ended it (its id, for the log line). */
  readonly migration?: string
  close(): Promise<void>
}

/** Moved: exit 0, after a moment for the caller to print, or when it serves, once its relayed clients went quiet. */
export function exitWhenMoved(guest: EndingGuest, to: string, forwarder: Forwarder, idleMs: number): void {
  const exit = () => void guest.close().then(() => process.exit(0))
  if (!forwarder.serving) return void setTimeout(exit, 50).unref()
  const timer = setInterval(() => {
    if (!forwarder.idleFor(idleMs)) return
    clearInterval(timer)
    const c = forwarder.counts
    logLine(guest.name, 'forwarded-exit', `moved to ${to}; forwarded ${c.connections} connection(s) and ${c.requests} request(s), ${c.bytes} bytes in ${forwarder.cpuMs.toFixed(1)} ms of CPU (${c.spliced} spliced natively), idle for ${idleMs} ms: exiting`, 'info', guest.migration)
    exit()
  }, 100)
}

/**
 * A migration failed after its hand-off (source 'moveFailed': the service runs neither here nor there; destination
 * 'failed': it lacks pages that cannot arrive now; the agent logged it). Without a listener of the service's own
 * (`ownListeners` are the guest's) and unless exitOnMoved is false, the process ends with exit code 4; a
 * destination at once (process.exit() would wait for threads blocked for ever on missing pages).
 */
export function emitOrExit(guest: EndingGuest, exitOnMoved: boolean, event: 'moveFailed' | 'failed', err: Error, ownListeners: number, why: string): void {
  const handled = guest.listenerCount(event) > ownListeners // before the emit, which removes once() listeners
  guest.emit(event, err)
  if (!exitOnMoved || handled) return
  logLine(guest.name, 'exiting', `exiting with code ${EXIT_MOVE_FAILED}: ${why}`, 'error', guest.migration)
  process.exitCode = EXIT_MOVE_FAILED // holds even if the loop runs dry before the timer
  const hard = event === 'failed' ? loadBinding().exitProcess : undefined
  setTimeout(() => (hard ? hard(EXIT_MOVE_FAILED) : void guest.close().then(() => process.exit(EXIT_MOVE_FAILED))), 50)
}
