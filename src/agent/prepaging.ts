/**
 * Push policies by name. Bubbling (Hines et al.) lives in bubbling.ts.
 */
import type { PageBitmap } from '../bitmap'
import { ErrorCode, UffdMigrateError } from '../errors'
import { DemandOnly, type PushPolicy, SequentialPush } from './push-policy'

export type PrepagingStrategy = 'push' | 'demand'

export interface PrepagingOptions {
  strategy: PrepagingStrategy
}

export const DEFAULT_PREPAGING: PrepagingOptions = { strategy: 'push' }

export function createPushPolicy(opts: PrepagingOptions, pending: PageBitmap[]): PushPolicy {
  switch (opts.strategy) {
    case 'push':
      return new SequentialPush(pending)
    case 'demand':
      return new DemandOnly()
    default:
      throw new UffdMigrateError(`unknown prepaging strategy ${JSON.stringify(opts.strategy)}`, ErrorCode.INVALID_ARG)
  }
}
