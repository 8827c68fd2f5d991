/**
 * The source's hand-off fate (src/agent/source/handoff-fate.ts): where the service runs as far as the source knows,
 * and what each rule that depends on it reads there. Every answer of the destination from every state.
 */
import { describe, expect, it } from 'vitest'
import type { Clock } from '../../src/agent/clock'
import { askFate, Fate, HandoffFate, sayWhereItRuns } from '../../src/agent/source/handoff-fate'
import type { SourceLink } from '../../src/agent/source/link'
import { ErrorCode, migrationError } from '../../src/errors'

type Step = 'handedOff' | 'arrived' | 'refused' | 'lost' | 'askedInVain' | 'reclaim'

function after(...steps: Step[]): HandoffFate {
  const f = new HandoffFate()
  for (const s of steps) f[s]()
  return f
}

const view = (f: HandoffFate) => ({ state: f.state, mayRunThere: f.mayRunThere, runsHere: f.runsHere, needsAsking: f.needsAsking })

describe('the hand-off fate', () => {
  it('before HANDOFF the service runs here; on the wire, unknown until the destination says; its word moves it once', () => {
    expect(view(after())).toEqual({ state: Fate.HERE, mayRunThere: false, runsHere: true, needsAsking: false })
    expect(view(after('handedOff'))).toEqual({ state: Fate.UNKNOWN, mayRunThere: true, runsHere: false, needsAsking: true })
    expect(view(after('handedOff', 'arrived'))).toEqual({ state: Fate.THERE, mayRunThere: true, runsHere: false, needsAsking: false })
    expect(view(after('handedOff', 'refused'))).toEqual({ state: Fate.BACK, mayRunThere: false, runsHere: true, needsAsking: false })
    expect(view(after('handedOff', 'lost'))).toEqual({ state: Fate.BACK, mayRunThere: false, runsHere: true, needsAsking: false })
  })

  it('a window asked in vain is not asked again: the service may still run there, and the source keeps its memory', () => {
    // (a takeover whose dials found nobody for 10 s asked another 10 s as it failed)
    expect(view(after('handedOff', 'askedInVain'))).toEqual({ state: Fate.UNKNOWN, mayRunThere: true, runsHere: false, needsAsking: false })
  })

  it('once the destination said it runs the service, only NO_SESSION brings it back: an ERROR saying it never started is a contradiction, not a reason to run it twice', () => {
    expect(after('handedOff', 'arrived', 'refused').state).toBe(Fate.THERE)
    expect(after('handedOff', 'arrived', 'lost').state).toBe(Fate.BACK)
    // back is final, and the destination's words before HANDOFF move nothing
    expect(after('handedOff', 'lost', 'arrived').state).toBe(Fate.BACK)
    expect(after('refused', 'arrived', 'lost').state).toBe(Fate.HERE)
  })

  it('reclaim (onDestinationLost resume): the service comes back here from unknown or there, never from here', () => {
    for (const before of [['handedOff'], ['handedOff', 'arrived'], ['handedOff', 'askedInVain']] as Step[][]) {
      const f = after(...before, 'reclaim')
      expect({ state: f.state, runsHere: f.runsHere, mayRunThere: f.mayRunThere }).toEqual({ state: Fate.RECLAIMED, runsHere: true, mayRunThere: false })
    }
    expect(after('reclaim').state).toBe(Fate.HERE)
    expect(after('handedOff', 'lost', 'reclaim').state).toBe(Fate.BACK) // (back by the destination's word already)
  })

  it("a failure's error says where the service runs: resumed here, kept there (afterHandoff), or not known (runsOn unknown)", () => {
    const said = (...steps: Step[]) => {
      const err = new Error('boom')
      sayWhereItRuns(err, after(...steps))
      return { message: err.message, afterHandoff: (err as { afterHandoff?: boolean }).afterHandoff, runsOn: (err as { runsOn?: string }).runsOn }
    }
    expect(said()).toEqual({ message: 'boom', afterHandoff: undefined, runsOn: undefined })
    expect(said('handedOff', 'lost')).toEqual({ message: 'boom (the service resumed on the source)', afterHandoff: undefined, runsOn: undefined })
    expect(said('handedOff', 'arrived', 'reclaim').message).toMatch(/^boom \(the destination was lost after the hand-off: the service resumed on the source with its state as of the hand-off/)
    expect(said('handedOff', 'arrived')).toEqual({ message: 'boom (after the hand-off: the source keeps its memory until the destination settles)', afterHandoff: true, runsOn: undefined })
    expect(said('handedOff', 'askedInVain')).toEqual({ message: 'boom (after the hand-off, which the destination never confirmed: the service may run there: the source keeps its memory until the destination settles)', afterHandoff: true, runsOn: 'unknown' })
  })

  it('HANDOFF goes once: a second one is a bug of the engine (ERR_AGENT)', () => {
    expect(() => after('handedOff', 'handedOff')).toThrow(expect.objectContaining({ code: 'ERR_AGENT' }))
  })

  /** A clock whose waits pass at once, time moving on by them: a redial window of 10 s asked in a few turns. */
  function skippingClock(): Clock {
    let t = 0
    return { now: () => t, setTimeout: (fn, ms) => setImmediate(() => ((t += ms), fn())), clearTimeout: () => {}, setImmediate: (fn) => void setImmediate(fn) }
  }
  const cause = migrationError(ErrorCode.AGENT, 'a bug of the source\'s own right after HANDOFF')

  it('askFate: a destination nobody reaches for the whole window leaves the fate unknown, asked (the source keeps its memory); NO_SESSION brings the service back', async () => {
    const unreached = after('handedOff')
    let dials = 0
    await askFate({ open: async () => { dials++; throw migrationError(ErrorCode.CONNECT, 'connection refused') }, clock: skippingClock(), linkTimeoutMs: 1000, forMs: 10_000, cause }, unreached)
    expect(dials).toBeGreaterThan(5) // it did dial again and again, backing off, until the window ran out
    expect(view(unreached)).toEqual({ state: Fate.UNKNOWN, mayRunThere: true, runsHere: false, needsAsking: false })

    const lost = after('handedOff')
    await askFate({ open: async () => { throw migrationError(ErrorCode.NO_SESSION, 'no session') }, clock: skippingClock(), linkTimeoutMs: 1000, forMs: 10_000, cause }, lost)
    expect(lost.state).toBe(Fate.BACK)

    // the destination's own refusal ends the asking at once, the fate unknown (it may run there)
    const refusedToAnswer = after('handedOff')
    let tries = 0
    await askFate({ open: async (): Promise<SourceLink> => { tries++; throw Object.assign(migrationError(ErrorCode.BUSY, 'peer reported: another session'), { fromPeer: true }) }, clock: skippingClock(), linkTimeoutMs: 1000, forMs: 10_000, cause }, refusedToAnswer)
    expect({ tries, state: refusedToAnswer.state, needsAsking: refusedToAnswer.needsAsking }).toEqual({ tries: 1, state: Fate.UNKNOWN, needsAsking: false })
  })
})
