/**
 * Push policies by name: the strategy option of migrate() and `send --prepaging`.
 *   bubble   k = 7 pivots, adaptive windows (Hines et al.'s best), the default
 *   bubble1  one pivot, fixed window (the paper's simple bubbling)
 *   push     front-to-back background push, steered by nothing
 *   demand   pages move only when faulted or asked for
 */
import type { PageBitmap } from '../bitmap'
import { ErrorCode, UffdMigrateError } from '../errors'
import { BUBBLE_DEFAULTS, BubblingPush } from './bubbling'
import { DemandOnly, type PushPolicy, SequentialPush } from './push-policy'

export type PrepagingStrategy = 'bubble' | 'bubble1' | 'push' | 'demand'
export const PREPAGING_STRATEGIES: PrepagingStrategy[] = ['bubble', 'bubble1', 'push', 'demand']

export interface PrepagingOptions {
  strategy: PrepagingStrategy
  /** Pivots for 'bubble' (default 7). */
  pivots?: number
  /** demand: fill the rest front to back once the guest went this long without a fault (so that it can settle). */
  idleFillMs?: number
}

export const DEFAULT_PREPAGING: PrepagingOptions = { strategy: 'bubble' }

/**
 * Checks prepaging options when migrate() is called: a strategy the agent
 * cannot build would otherwise fail only at the hand-off, after the pause.
 */
export function validatePrepaging(o: Partial<PrepagingOptions> | undefined): PrepagingOptions {
  const bad = (what: string) => new UffdMigrateError(what, ErrorCode.INVALID_ARG)
  const out: PrepagingOptions = { ...DEFAULT_PREPAGING, ...o }
  if (!PREPAGING_STRATEGIES.includes(out.strategy)) {
    throw bad(`unknown prepaging strategy ${JSON.stringify(out.strategy)}: expected one of ${PREPAGING_STRATEGIES.join(', ')}`)
  }
  if (out.pivots !== undefined && !(Number.isInteger(out.pivots) && out.pivots >= 1 && out.pivots <= 64)) {
    throw bad(`expected prepaging.pivots to be an integer in 1..64, got ${JSON.stringify(out.pivots)}`)
  }
  if (out.idleFillMs !== undefined && !(out.idleFillMs >= 0 && out.idleFillMs <= 3_600_000)) {
    throw bad(`expected prepaging.idleFillMs in 0..3600000, got ${JSON.stringify(out.idleFillMs)}`)
  }
  return out
}

export function createPushPolicy(opts: PrepagingOptions, pending: PageBitmap[]): PushPolicy {
  switch (opts.strategy) {
    case 'bubble':
      return new BubblingPush(pending, { ...BUBBLE_DEFAULTS, pivots: opts.pivots ?? BUBBLE_DEFAULTS.pivots })
    case 'bubble1':
      return new BubblingPush(pending, { ...BUBBLE_DEFAULTS, pivots: 1, adaptive: false })
    case 'push':
      return new SequentialPush(pending)
    case 'demand':
      return new DemandOnly(pending, opts.idleFillMs ?? 1000)
    default:
      throw new UffdMigrateError(`unknown prepaging strategy ${JSON.stringify(opts.strategy)}: expected one of ${PREPAGING_STRATEGIES.join(', ')}`, ErrorCode.INVALID_ARG)
  }
}
