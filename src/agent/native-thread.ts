/**
 * A native thread of the addon (demand server, demand client, bulk reader)
 * with the handler of its event batches. close() stops and joins it, then
 * hands what it emitted since its last batch to the same handler, at once:
 * whatever is counted after close() (a settled report, the source's totals)
 * sees everything the thread did.
 */
export class NativeThread<T extends { close(): Float64Array }> {
  constructor(
    readonly thread: T,
    private readonly onEvents: (ev: Float64Array) => void,
  ) {}

  close(): void {
    const left = this.thread.close()
    if (left.length) this.onEvents(left)
  }
}
