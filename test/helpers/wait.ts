/**
 * Waiting in tests for something another process or thread does. Never a bound on how long it may take: a loaded
 * machine is slow, so the limits are generous and the caller asserts what it waited for (its message then names the
 * value), rather than trusting a timer.
 */

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

/** Polls `ok` every `stepMs` until it holds or `ms` passed; whether it held. */
export async function pollUntil(ok: () => boolean | Promise<boolean>, ms: number, stepMs = 20): Promise<boolean> {
  for (const end = Date.now() + ms; ; await sleep(stepMs)) {
    if (await ok()) return true
    if (Date.now() > end) return false
  }
}

/** Calls `f` until it resolves (e.g. a request to a server that is starting); its last error once `ms` passed. */
export async function retry<T>(f: () => Promise<T>, ms = 20_000, stepMs = 50): Promise<T> {
  for (const end = Date.now() + ms; ; await sleep(stepMs)) {
    try {
      return await f()
    } catch (err) {
      if (Date.now() > end) throw err
    }
  }
}
