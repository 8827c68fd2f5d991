/**
 * Two hosts on one machine: a network namespace joined to the root namespace
 * by a veth pair, optionally shaped with tbf like a Gigabit LAN. Root only.
 */
import { execFileSync } from 'node:child_process'

export interface HostPair {
  /** Namespace of the second host. */
  ns: string
  /** Address of the root-namespace end (the first host). */
  hostIp: string
  /** Address of the namespace end (the second host). */
  nsIp: string
  /** The veth ends: in the root namespace, and in the second host's. */
  hostDev: string
  nsDev: string
  /** Shape both directions with tbf at rateMbit. */
  shape(rateMbit: number): void
  /** Take the link down (no carrier: packets vanish, nobody gets a reset) or bring it back. */
  setLinkUp(up: boolean): void
  cleanup(): void
}

const ip = (...args: string[]) => execFileSync('ip', args, { stdio: 'pipe' })

export function createHostPair(index = process.pid % 200): HostPair {
  const ns = `uffdm${index}`
  const a = `uffdm${index}a`
  const b = `uffdm${index}b`
  const hostIp = `10.231.${index}.1`
  const nsIp = `10.231.${index}.2`
  try {
    ip('netns', 'del', ns)
  } catch {
    // not there: fine
  }
  ip('netns', 'add', ns)
  ip('link', 'add', a, 'type', 'veth', 'peer', 'name', b)
  ip('link', 'set', b, 'netns', ns)
  ip('addr', 'add', `${hostIp}/24`, 'dev', a)
  ip('link', 'set', a, 'up')
  ip('netns', 'exec', ns, 'ip', 'addr', 'add', `${nsIp}/24`, 'dev', b)
  ip('netns', 'exec', ns, 'ip', 'link', 'set', b, 'up')
  ip('netns', 'exec', ns, 'ip', 'link', 'set', 'lo', 'up')
  return {
    ns, hostIp, nsIp, hostDev: a, nsDev: b,
    shape(rateMbit: number) {
      const tbf = ['qdisc', 'replace', 'dev']
      const args = ['root', 'tbf', 'rate', `${rateMbit}mbit`, 'burst', '256kb', 'latency', '20ms']
      execFileSync('tc', [...tbf, a, ...args])
      execFileSync('ip', ['netns', 'exec', ns, 'tc', ...tbf, b, ...args])
    },
    setLinkUp(up: boolean) {
      ip('link', 'set', a, up ? 'up' : 'down')
    },
    cleanup() {
      try {
        ip('netns', 'del', ns)
      } catch {
        // already gone
      }
      try {
        ip('link', 'del', a)
      } catch {
        // went with the namespace
      }
    },
  }
}

/** Why namespace hosts cannot be made here, or undefined. */
export function netnsUnavailable(): string | undefined {
  if (process.getuid?.() !== 0) return 'network namespaces need root'
  try {
    execFileSync('ip', ['netns', 'list'], { stdio: 'pipe' })
    return undefined
  } catch (err) {
    return `ip netns is not usable: ${(err as Error).message.split('\n')[0]}`
  }
}
