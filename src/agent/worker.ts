/**
 * Entry point of the agent's worker thread. A standby (src/agent-handle.ts) waits for a crashed agent's will with
 * little loaded (standby.ts: it starts during a pre-copy or a post-copy, whose CPUs are busy); every other agent, and a standby
 * that takes over, runs agent-main.ts.
 */
import { workerData } from 'node:worker_threads'
import type { AgentWorkerData } from './worker-data'

if ((workerData as AgentWorkerData).standby) require('./standby')
else require('./agent-main')
