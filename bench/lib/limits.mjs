// Reference figures for this machine from the C microbenchmarks in
// ../shared/limits (next to the repository): what the kernel and hardware
// allow with no Node in the way. Benchmarks print them beside their own
// figures so that each target is a ratio measured in the same run.
import { spawnSync } from 'node:child_process'
import { existsSync, mkdirSync, readdirSync, statSync } from 'node:fs'
import { basename, dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'

export const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..')

/** Where the reference runner lives: $LIMITS_RUN, else <repo>/../shared/limits/run. */
export function limitsScript(root = repoRoot) {
  return process.env.LIMITS_RUN || join(root, '..', 'shared', 'limits', 'run')
}

/**
 * Parses `RESULT|id|description|unit|min|median|max` lines.
 * @param {string} text
 * @returns {Map<string, {id: string, description: string, unit: string, min: number, median: number, max: number}>}
 */
export function parseLimits(text) {
  const out = new Map()
  for (const line of text.split('\n')) {
    if (!line.startsWith('RESULT|')) continue
    const f = line.trim().split('|')
    if (f.length < 7) continue
    // the description never holds '|', but be lenient: the last four fields are fixed
    const [min, median, max] = f.slice(-3).map(Number)
    const unit = f[f.length - 4]
    const id = f[1]
    const description = f.slice(2, f.length - 4).join('|')
    out.set(id, { id, description, unit, min, median, max })
  }
  return out
}

function warn(msg) {
  const bar = '!'.repeat(78)
  process.stderr.write(`\n${bar}\n!! ${msg.split('\n').join('\n!! ')}\n${bar}\n\n`)
}

/**
 * Runs `../shared/limits/run SECTION...` and returns its figures by id.
 * Missing script: a loud warning and an empty map (benchmarks then print
 * their own figures without references). Blocks until the script is done
 * (the C references take minutes); its stderr passes through.
 * @param {string[]} sections e.g. ['fault-rtt', 'copy']
 * @param {{nruns?: number, root?: string, env?: Record<string,string>, log?: (s: string) => void}} [opts]
 */
export function runLimits(sections, { nruns = Number(process.env.NRUNS) || 3, root = repoRoot, env = {}, log } = {}) {
  const script = limitsScript(root)
  if (!existsSync(script)) {
    warn(`reference figures unavailable: ${script} does not exist.\nTargets that are ratios to the C reference cannot be checked in this run.`)
    return new Map()
  }
  log?.(`running ${script} ${sections.join(' ')} (NRUNS=${nruns}) ...`)
  const t0 = Date.now()
  const r = spawnSync(script, sections, {
    env: { ...process.env, NRUNS: String(nruns), ...env },
    stdio: ['ignore', 'pipe', 'inherit'],
    encoding: 'utf8',
    maxBuffer: 64 << 20,
  })
  const got = parseLimits(r.stdout ?? '')
  if (r.error || r.status !== 0) {
    warn(
      `reference run failed (${r.error ? r.error.message : r.signal ? `signal ${r.signal}` : `exit ${r.status}`}): ` +
        `${script} ${sections.join(' ')}\n${got.size} figures were parsed before it stopped.`,
    )
  }
  log?.(`reference figures: ${got.size} in ${((Date.now() - t0) / 1000).toFixed(0)} s`)
  return got
}

/**
 * Compiles a C program of bench/c (when missing, or older than its source,
 * common.h or a header beside it) into $TMPDIR/uffd-bench-bin; returns the
 * binary's path, or null after a loud warning (no gcc, no common.h).
 * @param {string} source path of the .c file
 * @param {string} [root]
 */
export function buildCBench(source, root = repoRoot) {
  const limitsDir = dirname(limitsScript(root))
  if (!existsSync(join(limitsDir, 'common.h'))) {
    warn(`cannot build ${source}: ${join(limitsDir, 'common.h')} does not exist`)
    return null
  }
  const binDir = join(process.env.TMPDIR || '/tmp', 'uffd-bench-bin')
  mkdirSync(binDir, { recursive: true })
  const bin = join(binDir, basename(source, '.c'))
  const stale = (p) => !existsSync(bin) || statSync(p).mtimeMs > statSync(bin).mtimeMs
  const headers = readdirSync(dirname(source)).filter((f) => f.endsWith('.h')).map((f) => join(dirname(source), f))
  if ([source, join(limitsDir, 'common.h'), ...headers].some(stale)) {
    const cc = spawnSync('gcc', ['-O2', '-Wall', '-I', limitsDir, '-o', bin, source, '-lpthread'], { stdio: ['ignore', 'inherit', 'inherit'] })
    if (cc.error || cc.status !== 0) {
      warn(`could not compile ${source} (${cc.error ? cc.error.message : `gcc exit ${cc.status}`})`)
      return null
    }
  }
  return bin
}

/**
 * Compiles (see buildCBench) and runs a C benchmark of our own that follows
 * the same conventions (includes the references' common.h, prints RESULT
 * lines); returns its figures by id. Missing gcc or common.h: a loud warning
 * and an empty map.
 * @param {string} source path of the .c file
 * @param {{nruns?: number, root?: string, env?: Record<string,string>, args?: string[], log?: (s: string) => void}} [opts]
 */
export function runCBench(source, { nruns = Number(process.env.NRUNS) || 3, root = repoRoot, env = {}, args = [], log } = {}) {
  const bin = buildCBench(source, root)
  if (!bin) return new Map()
  log?.(`running ${bin} ${args.join(' ')} (NRUNS=${nruns}) ...`)
  const r = spawnSync(bin, args, {
    env: { QUIET_GATE: '5', MAX_RETRY: '1', ...process.env, NRUNS: String(nruns), ...env },
    stdio: ['ignore', 'pipe', 'inherit'],
    encoding: 'utf8',
  })
  const got = parseLimits(r.stdout ?? '')
  if (r.error || r.status !== 0) warn(`${bin} failed (${r.error ? r.error.message : `exit ${r.status}`}); ${got.size} figures parsed`)
  return got
}
