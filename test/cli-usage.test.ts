/**
 * The CLI's usage errors exit 2 with commander's message, so that a script
 * can tell them from exit 1 ("the migration failed before the hand-off, the
 * service runs on here"). No kernel feature needed: nothing gets that far.
 */
import { spawnSync } from 'node:child_process'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'

const cli = join(__dirname, '..', 'bin', 'uffd-migrate.js')
const run = (args: string[]) => {
  const r = spawnSync(process.execPath, [cli, ...args], { encoding: 'utf8', env: { ...process.env, XDG_RUNTIME_DIR: join(__dirname, 'no-such-dir') } })
  return { code: r.status, stderr: r.stderr, stdout: r.stdout }
}

describe('CLI usage', () => {
  it.each([
    [['send', '--guest', 'g'], /required option '--to <addr>' not specified/],
    [['send', '--guest', 'g', '--to', '127.0.0.1:1', '--mode', 'fast'], /argument 'fast' is invalid\. Allowed choices are precopy, postcopy, hybrid/],
    [['send', '--guest', 'g', '--to', '127.0.0.1:1', '--downtime-ms', 'abc'], /'--downtime-ms <ms>' argument 'abc' is invalid\. expected a positive number/],
    [['send', '--guest', 'g', '--to', '127.0.0.1:1', '--bogus'], /unknown option '--bogus'/],
    [['frobnicate'], /unknown command 'frobnicate'/],
    [['receive', '--listen', '127.0.0.1:7070'], /missing required argument 'cmd'/],
  ])('%j: exit 2', (args, message) => {
    const r = run(args)
    expect(r.stderr).toMatch(message)
    expect(r.code).toBe(2)
  })

  it('help exits 0; a guest that is not there is a failure (exit 1), not a usage error', () => {
    const help = run(['send', '--help'])
    expect(help.code).toBe(0)
    expect(help.stdout).toMatch(/--downtime-ms/)
    const r = run(['status', '--guest', 'nosuch'])
    expect(r.stderr).toMatch(/no guest named 'nosuch' is running here .*\[ERR_NO_GUEST\]/)
    expect(r.code).toBe(1)
  })

  it('a reader that stops early (`| head`) is not an error: no stack trace, the command\'s own exit status', () => {
    const own = run(['doctor']).code
    const r = spawnSync('bash', ['-c', `"${process.execPath}" "${cli}" doctor | true; echo "exit \${PIPESTATUS[0]}"`], { encoding: 'utf8' })
    expect(r.stderr).not.toMatch(/EPIPE|Unhandled 'error' event/)
    expect(r.stdout.trim()).toBe(`exit ${own}`)
  })
})
