/** Messages between the service's main thread (guest.ts) and the agent's worker. */
import type { SourceOptions, Progress } from './source'
import type { MigrationReport } from './report'

export type WireSourceOptions = Omit<SourceOptions, 'token'> & { token: string }

export type MainToAgent =
  | { type: 'migrate'; options: WireSourceOptions }
  | { type: 'paused'; state: Uint8Array }
  | { type: 'pauseFailed'; error: { code: string; message: string } }
  | { type: 'free'; region: number; firstPage: number; pageCount: number }
  | { type: 'resumed'; atMs: number }
  | { type: 'request'; region: number; firstPage: number; pageCount: number; urgent: boolean }
  | { type: 'wait'; id: number; region: number; firstPage: number; pageCount: number }
  | { type: 'close' }

export type AgentToMain =
  | { type: 'pause' }
  | { type: 'resume' }
  | { type: 'progress'; progress: Progress }
  | { type: 'report'; report: MigrationReport }
  | { type: 'failed'; error: { code: string; message: string } }
  | { type: 'listening'; port: number; atMs: number }
  | { type: 'restore'; state: Uint8Array }
  | { type: 'ready'; ids: number[] }
  | { type: 'settled' }
  | { type: 'recovering'; message: string }
