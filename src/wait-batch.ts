/**
 * ready() waits of the service, on their way to the agent: one message per
 * turn of the service's code, not one per call. A page-store writer calls
 * ready() ~100 times in one 10 ms tick right after a post-copy hand-off; each
 * message is a structured clone and a wake-up of the agent's thread, on a
 * machine whose CPUs are then busiest (the push, the faults, code compiled
 * for the first time).
 */
export class WaitBatch {
  private nextId = 1
  /** id, region, first page, page count; four numbers a wait. */
  private waits: number[] = []

  constructor(private readonly send: (waits: number[]) => void) {}

  /** Queues a wait; it goes with the others of this turn once the current code yields (a microtask). Returns its id. */
  add(region: number, first: number, count: number): number {
    const id = this.nextId++
    if (this.waits.length === 0) queueMicrotask(() => this.flush())
    this.waits.push(id, region, first, count)
    return id
  }

  private flush(): void {
    const waits = this.waits
    this.waits = []
    if (waits.length) this.send(waits)
  }
}
