#!/usr/bin/env node
// Proof on an older kernel (issue 13): boots Debian's Linux VERSION kernel
// under QEMU with an initramfs holding this machine's Node, the built addon,
// dist/ and the examples, and runs scripts/kernel-guest.mjs inside it: the
// doctor, then migrations between two processes, every byte verified.
//
//   npm run test:kernel -- 6.1            (after `npm install`; builds nothing)
//   npm run test:kernel -- 6.1 --check    says what is missing (exit 2) or 'ready' (exit 0); downloads nothing
//
// Needs: qemu-system-x86_64 (apt-get install qemu-system-x86), a static
// busybox (apt-get install busybox-static), dpkg-deb, and the kernel package
// linux-image-VERSION.*-amd64-unsigned: taken from $UFFD_MIGRATE_KERNEL_CACHE
// (default ~/.cache/uffd-migrate/kernels), else fetched there with
// `apt-get download` (Debian 12's archive has 6.1). Uses KVM when /dev/kvm
// exists and can start the guest, else TCG (a few minutes on 2 vCPUs);
// UFFD_MIGRATE_KERNEL_ACCEL=kvm|tcg chooses. Exit 0 only when the guest
// printed KERNEL-TEST PASS.
import { spawn, spawnSync } from 'node:child_process'
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, realpathSync, statSync, writeFileSync } from 'node:fs'
import { createWriteStream } from 'node:fs'
import { homedir, tmpdir } from 'node:os'
import { dirname, join, relative } from 'node:path'
import { fileURLToPath } from 'node:url'

const root = join(dirname(fileURLToPath(import.meta.url)), '..')
const args_ = process.argv.slice(2)
const checkOnly = args_.includes('--check')
const version = args_.find((a) => !a.startsWith('--')) ?? '6.1'
const timeoutS = Number(process.env.KERNEL_TEST_TIMEOUT_S ?? 1200)
const die = (msg) => {
  process.stderr.write(`test:kernel: ${msg}\n`)
  process.exit(2)
}
const which = (cmd) => spawnSync('sh', ['-c', `command -v ${cmd}`], { encoding: 'utf8' }).stdout.trim()

// ---- tools -------------------------------------------------------------------------
const qemu = which('qemu-system-x86_64') || die('qemu-system-x86_64 not found: apt-get install qemu-system-x86')
const busybox = which('busybox') || die('busybox not found: apt-get install busybox-static')
if (spawnSync('sh', ['-c', `ldd ${busybox}`], { encoding: 'utf8' }).stdout.includes('=>')) die(`${busybox} is dynamically linked: apt-get install busybox-static`)
if (!which('dpkg-deb')) die('dpkg-deb not found (Debian/Ubuntu only)')
for (const f of ['dist/index.js', 'build/Release/uffd_migrate.node']) if (!existsSync(join(root, f))) die(`${f} missing: run npm install first`)

// ---- the kernel ----------------------------------------------------------------------
const cache = process.env.UFFD_MIGRATE_KERNEL_CACHE ?? join(homedir(), '.cache', 'uffd-migrate', 'kernels')
mkdirSync(cache, { recursive: true })
const pkgRe = new RegExp(`^linux-image-${version.replace(/\./g, '\\.')}\\.[0-9]+-[0-9]+-amd64-unsigned_.*\\.deb$`)
let deb = readdirSync(cache).filter((f) => pkgRe.test(f)).sort().pop()
if (!deb && (checkOnly || process.env.KERNEL_TEST_NO_FETCH)) {
  die(`no Linux ${version} package (linux-image-${version}.*-amd64-unsigned .deb) in ${cache}: \`npm run test:kernel -- ${version}\` fetches it once with apt-get download`)
}
if (checkOnly) {
  process.stdout.write(`ready: ${deb}\n`)
  process.exit(0)
}
if (!deb) {
  const search = spawnSync('apt-cache', ['search', '--names-only', `^linux-image-${version.replace(/\./g, '\\.')}\\.[0-9]+-[0-9]+-amd64-unsigned$`], { encoding: 'utf8' })
  const pkg = search.stdout.split('\n').map((l) => l.split(' ')[0]).filter(Boolean).sort((a, b) => a.localeCompare(b, undefined, { numeric: true })).pop()
  if (!pkg) die(`no linux-image-${version}.*-amd64-unsigned package known to apt (Debian 12 has 6.1): put its .deb in ${cache}`)
  process.stderr.write(`test:kernel: fetching ${pkg} into ${cache}\n`)
  const got = spawnSync('apt-get', ['download', pkg], { cwd: cache, stdio: 'inherit' })
  if (got.status !== 0) die(`apt-get download ${pkg} failed`)
  deb = readdirSync(cache).filter((f) => pkgRe.test(f)).sort().pop() ?? die('downloaded package not found')
}
const kdir = join(cache, deb.replace(/\.deb$/, ''))
if (!existsSync(kdir)) {
  const x = spawnSync('dpkg-deb', ['-x', join(cache, deb), kdir], { stdio: 'inherit' })
  if (x.status !== 0) die(`dpkg-deb -x ${deb} failed`)
}
const vmlinuz = readdirSync(join(kdir, 'boot')).find((f) => f.startsWith('vmlinuz-')) ?? die(`no vmlinuz in ${deb}`)

// ---- the initramfs (cpio newc, uncompressed: nothing to inflate under TCG) -----------
const work = mkdtempSync(join(tmpdir(), 'uffd-kernel-'))
const initrd = join(work, 'initrd.cpio')
const entries = new Map() // archive path -> { host } | { data, mode } | { link }
const addDir = (p) => {
  for (let d = p; d && d !== '.' && !entries.has(d); d = dirname(d)) entries.set(d, { dir: true })
}
const addFile = (path, host) => {
  addDir(dirname(path))
  entries.set(path, { host })
}
const addTree = (hostDir, at) => {
  for (const e of readdirSync(hostDir, { withFileTypes: true })) {
    const h = join(hostDir, e.name), a = join(at, e.name)
    if (e.isDirectory()) addTree(h, a)
    else if (e.isSymbolicLink()) (addDir(at), entries.set(a, { link: readlinkSync(h) }))
    else if (e.isFile()) addFile(a, h)
  }
}
const node = realpathSync(process.execPath)
addFile('usr/bin/node', node)
for (const line of spawnSync('ldd', [node], { encoding: 'utf8' }).stdout.split('\n')) {
  const lib = line.match(/(\/\S+)\s+\(0x/)?.[1]
  if (lib) addFile(lib.slice(1), realpathSync(lib))
}
addFile('bin/busybox', busybox)
for (const d of ['dist', 'bin', 'examples']) addTree(join(root, d), join('app', d))
addFile('app/package.json', join(root, 'package.json'))
addFile('app/build/Release/uffd_migrate.node', join(root, 'build', 'Release', 'uffd_migrate.node'))
addFile('app/scripts/kernel-guest.mjs', join(root, 'scripts', 'kernel-guest.mjs'))
// the runtime dependencies only (npm ls --omit=dev)
const deps = spawnSync('npm', ['ls', '--omit=dev', '--parseable', '--all'], { cwd: root, encoding: 'utf8' }).stdout.split('\n').filter((p) => p && p !== root)
for (const d of deps) addTree(d, join('app', relative(root, d)))
for (const d of ['proc', 'sys', 'dev', 'tmp', 'run', 'root', 'etc']) addDir(d)
entries.set('etc/hosts', { data: '127.0.0.1 localhost\n' })
entries.set('init', {
  mode: 0o755,
  data: `#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin HOME=/root TMPDIR=/tmp
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev; mount -t tmpfs tmp /tmp; mount -t tmpfs run /run
ip link set lo up
cd /app
echo "=== uname: $(uname -a)"
echo "=== doctor (auto)"
node bin/uffd-migrate.js doctor
echo "=== doctor exit $?"
node scripts/kernel-guest.mjs
echo "=== kernel-guest exit $?"
poweroff -f
`,
})

writeCpio(initrd, entries)

// ---- boot ------------------------------------------------------------------------
// KVM when /dev/kvm exists, unless UFFD_MIGRATE_KERNEL_ACCEL=tcg; a KVM that cannot start the guest at all (nested
// KVM refusing an MSR: "failed to set MSR 0x10a", seen on a Firecracker VM whose /dev/kvm exists) falls back to TCG.
const accelEnv = process.env.UFFD_MIGRATE_KERNEL_ACCEL
if (accelEnv && !['kvm', 'tcg'].includes(accelEnv)) die(`UFFD_MIGRATE_KERNEL_ACCEL must be kvm or tcg, got ${accelEnv}`)
const started = Date.now()
/** Seconds a KVM guest has to print its first kernel line (it takes a second or two when KVM works). */
const KVM_START_S = 60

boot(accelEnv ? accelEnv === 'kvm' : existsSync('/dev/kvm'))

function boot(kvm) {
  const args = [
    '-kernel', join(kdir, 'boot', vmlinuz), '-initrd', initrd,
    '-append', 'console=ttyS0 panic=-1 rdinit=/init loglevel=4',
    '-m', process.env.KERNEL_TEST_MEM ?? '3072', '-smp', '2', '-nographic', '-no-reboot', '-nic', 'none',
    ...(kvm ? ['-enable-kvm', '-cpu', 'host'] : ['-accel', 'tcg,thread=multi', '-cpu', 'max']),
  ]
  process.stderr.write(`test:kernel: booting ${vmlinuz} (${kvm ? 'KVM' : 'TCG: slow'}), initramfs ${(statSync(initrd).size / 2 ** 20).toFixed(0)} MiB, log ${join(work, 'console.log')}\n`)
  const log = createWriteStream(join(work, 'console.log'))
  const vm = spawn(qemu, args, { stdio: ['ignore', 'pipe', 'pipe'] })
  let out = ''
  for (const s of [vm.stdout, vm.stderr]) {
    s.on('data', (b) => {
      out += b.toString()
      log.write(b)
      process.stdout.write(b)
    })
  }
  const timer = setTimeout(() => {
    process.stderr.write(`\ntest:kernel: no end after ${timeoutS} s: killing QEMU\n`)
    vm.kill('SIGKILL')
  }, timeoutS * 1000)
  // a KVM that starts but never gets the kernel going (a nested guest resetting in a loop after SeaBIOS, seen on a
  // Firecracker VM) would use up the whole time limit: without a kernel line by then, it is killed (TCG follows)
  const kvmStart = kvm && !accelEnv ? setTimeout(() => {
    if (/Linux version|=== /.test(out)) return
    process.stderr.write(`\ntest:kernel: no kernel line ${KVM_START_S} s after QEMU started with KVM: killing it\n`)
    vm.kill('SIGKILL')
  }, KVM_START_S * 1000) : undefined
  vm.on('exit', () => {
    clearTimeout(timer)
    clearTimeout(kvmStart)
    log.end()
    const pass = /KERNEL-TEST PASS/.test(out)
    // the guest never printed a line (its kernel did not start): KVM is unusable here, TCG is not
    if (!pass && kvm && !accelEnv && !/Linux version|=== /.test(out)) {
      process.stderr.write('\ntest:kernel: KVM could not start the guest; booting again with TCG (UFFD_MIGRATE_KERNEL_ACCEL=tcg skips the try)\n')
      return boot(false)
    }
    process.stderr.write(`\ntest:kernel: Linux ${version} guest ${pass ? 'PASSED' : 'FAILED'} in ${((Date.now() - started) / 1000).toFixed(0)} s (console log: ${join(work, 'console.log')})\n`)
    process.exit(pass ? 0 : 1)
  })
}

/** An uncompressed cpio archive in the kernel's "newc" format. */
function writeCpio(path, files) {
  const chunks = []
  let ino = 1
  const pad4 = (n) => Buffer.alloc((4 - (n % 4)) % 4)
  const push = (name, mode, data) => {
    const nameBuf = Buffer.from(name + '\0')
    const fields = [ino++, mode, 0, 0, 1, 0, data.length, 0, 0, 0, 0, nameBuf.length, 0]
    const header = Buffer.from('070701' + fields.map((v) => v.toString(16).padStart(8, '0')).join(''))
    chunks.push(header, nameBuf, pad4(header.length + nameBuf.length), data, pad4(data.length))
  }
  for (const name of [...files.keys()].sort()) {
    const e = files.get(name)
    if (e.dir) push(name, 0o040755, Buffer.alloc(0))
    else if (e.link !== undefined) push(name, 0o120777, Buffer.from(e.link))
    else if (e.host) push(name, 0o100000 | (statSync(e.host).mode & 0o777), readFileSync(e.host))
    else push(name, 0o100000 | (e.mode ?? 0o644), Buffer.from(e.data))
  }
  push('TRAILER!!!', 0, Buffer.alloc(0))
  writeFileSync(path, Buffer.concat(chunks))
}
