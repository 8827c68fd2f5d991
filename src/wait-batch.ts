/**
 * ready() waits of the service, on their way to the agent and until it answers: one message per turn of the
 * service's code, not one per call. A page-store writer calls ready() ~100 times in one 10 ms tick right after a
 * post-copy hand-off; each message is a structured clone and a wake-up of the agent's thread, on a machine whose CPUs
 * are then busiest (the push, the faults, code compiled for the first time). The open ones are kept, with what they
 * wait for: an agent that takes over from one that crashed is asked again (resend()).
 */
export class WaitBatch {
  private nextId = 1
  /** id, region, first page, page count; four numbers a wait. */
  private waits: number[] = []
  private readonly open = new Map<number, { resolve: () => void; reject: (e: Error) => void; range: [number, number, number] }>()

  constructor(private readonly send: (waits: number[]) => void) {}

  /** Queues a wait; it goes with the others of this turn once the current code yields (a microtask). Returns its id. */
  add(region: number, first: number, count: number): number {
    const id = this.nextId++
    if (this.waits.length === 0) queueMicrotask(() => this.flush())
    this.waits.push(id, region, first, count)
    return id
  }

  /** A wait whose promise settles when the agent answers (ready()), or all are ended (settled, failed). */
  wait(region: number, first: number, count: number): Promise<void> {
    return new Promise((resolve, reject) => this.open.set(this.add(region, first, count), { resolve, reject, range: [region, first, count] }))
  }

  /** The agent's answer: these are local now. */
  ready(ids: number[]): void {
    for (const id of ids) {
      this.open.get(id)?.resolve()
      this.open.delete(id)
    }
  }

  /** Every open wait ends: resolved (settled: everything is local) or rejected (the migration failed). */
  endAll(err?: Error): void {
    for (const w of this.open.values()) (err ? w.reject(err) : w.resolve())
    this.open.clear()
  }

  /** A new agent took over: it never heard of the open waits (in one message, with their ids). */
  resend(): void {
    const waits: number[] = []
    for (const [id, w] of this.open) waits.push(id, ...w.range)
    if (waits.length) this.send(waits)
  }

  private flush(): void {
    const waits = this.waits
    this.waits = []
    if (waits.length) this.send(waits)
  }
}
