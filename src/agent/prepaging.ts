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
