/**
 * What this machine allows: kernel, userfaultfd features, PAGEMAP_SCAN,
 * permissions, and a verdict that says what to do. Tests that need a feature
 * skip with the reason given here.
 */
import { readFileSync } from 'node:fs'
import { release } from 'node:os'
import { loadBinding } from './binding'
import { chooseTracker, resolveTrackerSetting, syncWpCost, type TrackerKind } from './agent/tracker-choice'
import { PRECOPY_BULK_SOCKET_BUFFER_BYTES } from './protocol/messages'
import { headroomCheck, memoryHeadroom } from './memory-headroom'

export interface FeatureCheck {
  name: string
  available: boolean
  /** Why not, or what it is used for. */
  detail: string
  /** Needed for migration to work at all. */
  required: boolean
}

export interface DoctorReport {
  kernel: string
  uid: number
  unprivilegedUserfaultfd: string
  features: FeatureCheck[]
  /** The dirty-page tracker a migration from here gets ($UFFD_MIGRATE_TRACKER respected), why, and what it costs; absent when none works. */
  tracker?: { kind: TrackerKind; reason: string; cost: string }
  ok: boolean
  verdict: string
}

/** CAP_NET_ADMIN (bit 12 of CapEff): SO_SNDBUFFORCE / SO_RCVBUFFORCE set buffers past net.core.wmem_max / rmem_max. */
function hasNetAdmin(): boolean {
  const m = /^CapEff:\s*([0-9a-f]+)$/m.exec(readSysctl('/proc/self/status'))
  return m !== null && (BigInt(`0x${m[1]}`) & (1n << 12n)) !== 0n
}

/**
 * Whether the bulk sockets get pre-copy's buffers here, and what happens if
 * not: the agent then leaves them to the kernel's autotuning (a set buffer
 * would be cut to the cap and no longer autotuned).
 */
export function socketBufferCheck(f: { rmemMax: number; wmemMax: number; netAdmin: boolean }): { available: boolean; detail: string } {
  const want = PRECOPY_BULK_SOCKET_BUFFER_BYTES, mib = want / (1 << 20)
  if (f.netAdmin) return { available: true, detail: `pre-copy's ${mib} MiB bulk socket buffers, past net.core.rmem_max / wmem_max if need be (CAP_NET_ADMIN)` }
  if (f.rmemMax >= want && f.wmemMax >= want) return { available: true, detail: `pre-copy's ${mib} MiB bulk socket buffers (net.core.rmem_max=${f.rmemMax}, wmem_max=${f.wmemMax})` }
  return {
    available: false,
    detail:
      `net.core.rmem_max=${f.rmemMax} / wmem_max=${f.wmemMax} are below pre-copy's ${mib} MiB and this process lacks CAP_NET_ADMIN: ` +
      `the kernel's autotuning sizes the bulk buffers instead (enough on most links); for the measured setting run ` +
      `sysctl -w net.core.rmem_max=${want} net.core.wmem_max=${want} on both hosts`,
  }
}

function readSysctl(path: string): string {
  try {
    return readFileSync(path, 'utf8').trim()
  } catch {
    return 'unknown'
  }
}

export function runDoctor(): DoctorReport {
  const kernel = release()
  const uid = process.getuid?.() ?? -1
  const unprivilegedUserfaultfd = readSysctl('/proc/sys/vm/unprivileged_userfaultfd')
  const features: FeatureCheck[] = []
  let tracker: DoctorReport['tracker']
  let trackerError = 'not probed'
  const add = (name: string, available: boolean, detail: string, required = true) =>
    features.push({ name, available, detail, required })
  let binding
  try {
    binding = loadBinding()
  } catch (err) {
    add('native addon', false, (err as Error).message)
    return finish()
  }
  const k = binding.constants
  const probe = binding.probe()
  const permHint =
    'run as root, grant CAP_SYS_PTRACE, set sysctl vm.unprivileged_userfaultfd=1, or give this user read/write access to /dev/userfaultfd'
  const explain = (e: 0 | string) =>
    e === 0 ? 'works' : e === 'EPERM' || e === 'EACCES' ? `${e}: ${permHint}` : e === 'ENOSYS' ? 'ENOSYS: kernel without CONFIG_USERFAULTFD' : e === 'ENOENT' ? 'ENOENT: no /dev/userfaultfd (Linux 6.1+)' : e
  add('userfaultfd syscall', probe.viaSyscall === 0, explain(probe.viaSyscall), false)
  add('/dev/userfaultfd', probe.viaDevice === 0, explain(probe.viaDevice), false)
  const uffdWorks = probe.viaSyscall === 0 || probe.viaDevice === 0
  const feat = (bit: number) => uffdWorks && (probe.features & bit) !== 0
  const why = (bit: number, minKernel: string, use: string) =>
    !uffdWorks ? 'userfaultfd cannot be opened (see above)' : feat(bit) ? use : `not offered by this kernel (needs Linux ${minKernel}+)`

  // MISSING and ZEROPAGE are per-range: try them on a one-page region.
  let missingDetail = 'userfaultfd cannot be opened (see above)'
  let missingOk = false
  let zeroOk = false
  let wpOk = false
  let wpDetail = missingDetail
  if (uffdWorks) {
    const region = binding.regionCreate(binding.pageSize)
    try {
      const uffd = new binding.Uffd(0)
      try {
        const ioctls = uffd.register(region.id, 0, binding.pageSize, k.UFFDIO_REGISTER_MODE_MISSING)
        missingOk = true
        missingDetail = 'demand paging on the destination'
        zeroOk = (ioctls & (1 << k._UFFDIO_ZEROPAGE)) !== 0
      } catch (err) {
        missingDetail = (err as Error).message
      } finally {
        uffd.close()
      }
      if (feat(k.UFFD_FEATURE_PAGEFAULT_FLAG_WP)) {
        const wp = new binding.Uffd(k.UFFD_FEATURE_PAGEFAULT_FLAG_WP)
        try {
          wp.register(region.id, 0, binding.pageSize, k.UFFDIO_REGISTER_MODE_WP)
          wpOk = true
          wpDetail = 'write-protect tracking'
        } catch (err) {
          wpDetail = (err as Error).message
        } finally {
          wp.close()
        }
      } else {
        wpDetail = 'not offered by this kernel (needs Linux 5.7+)'
      }
    } finally {
      binding.regionRelease(region.buffer)
    }
  }
  add('MISSING', missingOk, missingDetail)
  add('ZEROPAGE', zeroOk, zeroOk ? 'zero pages placed locally, never fetched' : 'UFFDIO_ZEROPAGE not offered for anonymous memory')
  // A tracker needs either WP_ASYNC + WP_UNPOPULATED + PAGEMAP_SCAN (wp-async) or WP alone (sync-wp): none of them is
  // required on its own; the tracker line says whether one works.
  add('WP', wpOk, wpOk ? 'write-protect (the sync-wp tracker, Linux 5.7+)' : wpDetail, false)
  add('WP_ASYNC', feat(k.UFFD_FEATURE_WP_ASYNC), why(k.UFFD_FEATURE_WP_ASYNC, '6.7', 'dirty tracking without a fault round trip (wp-async)'), false)
  add('WP_UNPOPULATED', feat(k.UFFD_FEATURE_WP_UNPOPULATED), why(k.UFFD_FEATURE_WP_UNPOPULATED, '6.4', 'tracks never-touched pages without MISSING (wp-async)'), false)
  add('PAGEMAP_SCAN', probe.pagemapScan === 0, probe.pagemapScan === 0 ? 'written/present page scans (wp-async)' : `${probe.pagemapScan}: needs Linux 6.7+`, false)
  add('MOVE', feat(k.UFFD_FEATURE_MOVE), why(k.UFFD_FEATURE_MOVE, '6.8', 'optional (UFFDIO_MOVE, not used yet)'), false)
  add('POISON', feat(k.UFFD_FEATURE_POISON), why(k.UFFD_FEATURE_POISON, '6.6', 'optional (UFFDIO_POISON, not used yet)'), false)
  try {
    const { setting, forcedBy } = resolveTrackerSetting(undefined)
    const facts = { features: uffdWorks ? probe.features : 0, constants: k, pagemapScan: probe.pagemapScan, syncWpBuilt: binding.SyncWpTracker !== undefined }
    // WP offered as a feature but refused on a real range (the try above): sync-wp cannot work either
    if (!wpOk) facts.features &= ~k.UFFD_FEATURE_PAGEFAULT_FLAG_WP
    const c = chooseTracker(facts, setting, forcedBy)
    tracker = { ...c, cost: c.kind === 'wp-async' ? 'a kernel-resolved fault per first write, a scan per round' : syncWpCost(binding.syncWpIdleClass?.() ?? false) }
  } catch (err) {
    trackerError = (err as Error).message
  }
  const buffers = socketBufferCheck({
    rmemMax: Number(readSysctl('/proc/sys/net/core/rmem_max')), wmemMax: Number(readSysctl('/proc/sys/net/core/wmem_max')), netAdmin: hasNetAdmin(),
  })
  add('socket buffers', buffers.available, buffers.detail, false)
  const memory = headroomCheck(memoryHeadroom())
  add('memory', memory.available, memory.detail, false)
  add('encryption', binding.nativeSealing === true, binding.nativeSealing === true
    ? `send/receive --encrypt seal every connection (AES-256-GCM over X25519), native threads moving the pages${process.env.UFFD_MIGRATE_ENCRYPT === '1' ? '; on by default here ($UFFD_MIGRATE_ENCRYPT=1)' : ''}`
    : 'this addon\'s threads cannot seal: encrypted migrations run in the agents\' loops (slower)', false)
  add('tracker', tracker !== undefined, tracker ? `${tracker.kind}: ${tracker.reason}; costs ${tracker.cost}` : trackerError)
  return finish()

  function finish(): DoctorReport {
    const missing = features.filter((f) => f.required && !f.available)
    const noOpen = features.length >= 2 && !features[0].available && !features[1].available
    const ok = missing.length === 0 && !noOpen
    let verdict: string
    if (ok) verdict = 'migration can work here: every required feature is available'
    else if (missing.length === 1 && missing[0].name === 'tracker') verdict = `migration cannot work here: ${missing[0].detail}`
    else if (noOpen) verdict = `migration cannot work here: userfaultfd cannot be opened. To fix: ${features[0].detail}`
    else
      verdict =
        `migration cannot work here: missing ${missing.map((f) => f.name).join(', ')}. ` +
        'To fix: run on Linux 5.7 or newer (6.7+ for the wp-async tracker) with CONFIG_USERFAULTFD, as root or with userfaultfd permission.'
    if (ok && tracker) verdict += `; dirty pages tracked by ${tracker.kind}`
    return { kernel, uid, unprivilegedUserfaultfd, features, ...(tracker ? { tracker } : {}), ok, verdict }
  }
}

/** Why a feature-gated test must skip, or undefined when it can run. */
export function skipReason(): string | undefined {
  const r = runDoctor()
  return r.ok ? undefined : r.verdict
}

export function formatDoctor(r: DoctorReport): string {
  const lines = [`kernel ${r.kernel}, uid ${r.uid}, vm.unprivileged_userfaultfd=${r.unprivilegedUserfaultfd}`]
  const w = Math.max(...r.features.map((f) => f.name.length))
  for (const f of r.features) {
    const mark = f.available ? 'ok  ' : f.required ? 'FAIL' : 'no  '
    lines.push(`  ${mark} ${f.name.padEnd(w)}  ${f.detail}`)
  }
  lines.push(r.verdict)
  return lines.join('\n')
}
