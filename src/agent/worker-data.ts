/** What a migration agent's worker thread is started with (src/agent/worker.ts). */
import type { RegionDescriptor } from '../region'
import type { SocketTuning } from '../options'
import type { TrackerOption } from './tracker'
import type { AgentWill } from './destination/takeover'

export interface AgentWorkerData {
  role: 'source' | 'destination'
  regions: RegionDescriptor[]
  /** destination: shared received bitmaps, one per region */
  received?: SharedArrayBuffer[]
  listen?: string
  token?: string
  /** Destination: insist on sealed connections (GuestOptions.encrypt). */
  encrypt?: boolean
  /** nice value of the agent's threads (0: as the service) */
  agentNice: number
  /** The guest's name, for the operator's log lines. */
  name?: string
  /** Which dirty-page tracker its migrations use (default: auto). */
  tracker?: TrackerOption
  /** The bulk socket's settings ($UFFD_MIGRATE_BULK_BUFFER_BYTES, $UFFD_MIGRATE_PUSH_UNSENT_BYTES), checked on the main thread. */
  sockets: SocketTuning
  /** Destination: its exit watch (native/exit_watch.cc), made by the service's thread, which takes failures on it. */
  exitWatch?: number
  /** This agent replaces one that crashed (src/agent-handle.ts); the crash injections below are not repeated in it. */
  takeover?: boolean
  /** Destination: idle until the agent's end hands it the agent's will (src/agent/destination/takeover.ts). */
  standby?: boolean
  /**
   * A standby started early (src/early-standby.ts): it waits for the will only once the service's thread sets this
   * flag (Int32 0 → 1: the service resumes here, or the agent crashed after asking for the restore). Before that, a
   * crash leaves the hand-off to the service's thread, which has not restored anything yet.
   */
  standbyGo?: SharedArrayBuffer
  /** A standby that took over: the crashed agent's will (set by standby.ts). */
  will?: AgentWill
}
