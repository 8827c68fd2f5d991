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
  /** With `migrationLink`: a second link between the same two hosts (a migration network apart from the service's). */
  migration?: MigrationLink
  cleanup(): void
}

/** A second veth pair between the hosts, its own subnet, that can go down alone. */
export interface MigrationLink {
  hostIp: string
  nsIp: string
  setLinkUp(up: boolean): void
}

const ip = (...args: string[]) => execFileSync('ip', args, { stdio: 'pipe' })

export function createHostPair(index = process.pid % 200, o: { migrationLink?: boolean } = {}): HostPair {
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
  veth(ns, a, b, hostIp, nsIp)
  ip('netns', 'exec', ns, 'ip', 'link', 'set', 'lo', 'up')
  const migration = o.migrationLink ? migrationLink(ns, index) : undefined
  return {
    ns, hostIp, nsIp, hostDev: a, nsDev: b, ...(migration ? { migration } : {}),
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

/** A veth pair: hostDev here with hostIp, nsDev in the namespace with nsIp, both up. */
function veth(ns: string, hostDev: string, nsDev: string, hostIp: string, nsIp: string): void {
  ip('link', 'add', hostDev, 'type', 'veth', 'peer', 'name', nsDev)
  ip('link', 'set', nsDev, 'netns', ns)
  ip('addr', 'add', `${hostIp}/24`, 'dev', hostDev)
  ip('link', 'set', hostDev, 'up')
  ip('netns', 'exec', ns, 'ip', 'addr', 'add', `${nsIp}/24`, 'dev', nsDev)
  ip('netns', 'exec', ns, 'ip', 'link', 'set', nsDev, 'up')
}

function migrationLink(ns: string, index: number): MigrationLink {
  const [m, n, hostIp, nsIp] = [`uffdm${index}m`, `uffdm${index}n`, `10.232.${index}.1`, `10.232.${index}.2`]
  veth(ns, m, n, hostIp, nsIp)
  return { hostIp, nsIp, setLinkUp: (up) => void ip('link', 'set', m, up ? 'up' : 'down') } // (goes with the namespace)
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
