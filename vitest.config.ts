import { defineConfig } from 'vitest/config'

export default defineConfig({
  test: {
    // Real processes, real sockets, real userfaultfd: one file at a time on a 2-core machine.
    fileParallelism: false,
    testTimeout: 60_000,
    hookTimeout: 60_000,
    pool: 'forks',
    reporters: ['default'],
    projects: [
      { extends: true, test: { name: 'default', include: ['test/**/*.test.ts'] } },
      // Every end-to-end test once more with the fallback tracker of Linux 5.7-6.6 forced (issue 13): the
      // processes they start inherit the variable: every mode, hops, cancel, failures, recovery, hints, free
      // pages. Not what does not depend on the source's tracker, to keep the suite short: the receiver's defences, the source's hold on stop signals and its resume after a lost destination
      // against hostile peers, the sealed link of encrypted migrations, streams that do not keep pace, the client forwarder, the README snippets; nor the 6.1 guest (it picks its own); nor
      // the soak (hops and agent-takeover cover its paths here; `UFFD_MIGRATE_TRACKER=sync-wp npm run soak` runs it).
      {
        extends: true,
        test: {
          name: 'sync-wp',
          include: ['test/**/*.e2e.test.ts'],
          exclude: ['test/hostile.e2e.test.ts', 'test/signals.e2e.test.ts', 'test/destination-lost.e2e.test.ts', 'test/encryption.e2e.test.ts', 'test/streams.e2e.test.ts', 'test/forward.e2e.test.ts', 'test/quickstart.e2e.test.ts', 'test/old-kernel.e2e.test.ts', 'test/soak.e2e.test.ts', '**/node_modules/**'],
          env: { UFFD_MIGRATE_TRACKER: 'sync-wp' },
        },
      },
    ],
  },
})
