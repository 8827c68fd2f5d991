import { defineConfig } from 'vitest/config'

// The pure tier: no addon, no socket, no kernel (passes with build/ removed).
export default defineConfig({
  test: {
    include: ['test/unit/**/*.test.ts'],
    testTimeout: 20_000,
    pool: 'threads',
    isolate: false,
    reporters: ['default'],
  },
})
