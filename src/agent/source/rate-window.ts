/** The send rate the progress line shows: bytes per second between the last two samples (one per progress tick). */
export class RateWindow {
  private atMs = 0
  private bytes = 0
  private bytesPerSec = 0

  /** The byte count at nowMs; returns the rate since the previous sample (the last one when the clock has not moved). */
  sample(nowMs: number, bytes: number): number {
    if (this.atMs && nowMs > this.atMs) this.bytesPerSec = ((bytes - this.bytes) / (nowMs - this.atMs)) * 1000
    this.atMs = nowMs
    this.bytes = bytes
    return this.bytesPerSec
  }
}
