import { ErrorCode, UffdMigrateError } from '../errors'

/** "host:port", "[v6]:port" or ":port"/"port" (all interfaces when listening). */
export function parseAddress(addr: string, defaultHost = '127.0.0.1'): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]*)):(\d+)$/.exec(addr) ?? /^()()(\d+)$/.exec(addr)
  const port = m ? Number(m[3]) : NaN
  if (!m || !Number.isInteger(port) || port < 1 || port > 65535) {
    throw new UffdMigrateError(`expected an address like host:7070, got ${JSON.stringify(addr)}`, ErrorCode.INVALID_ARG)
  }
  return { host: m[1] || m[2] || defaultHost, port }
}
