#!/usr/bin/env bash
# Build the addon with AddressSanitizer + UBSan (native/CMakeLists.txt, via
# cmake-js, offline) and run the vitest suite against it.
#
#   scripts/test-asan.sh [vitest args...]   build if needed, then `vitest run [args]`
#   scripts/test-asan.sh --build-only       (re)build only  (npm run build:asan)
#   scripts/test-asan.sh --rebuild [args]   clean rebuild, then test
#
# Output: build-asan/Debug/uffd_migrate.node. Extra ASAN_OPTIONS/UBSAN_OPTIONS
# from the environment are appended (later options win).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="$ROOT/build-asan"
ADDON="$OUT/Debug/uffd_migrate.node"

die() { echo "test-asan: $*" >&2; exit 1; }

mode=test
case "${1:-}" in
  --build-only) mode=build; shift ;;
  --rebuild) mode=rebuild; shift ;;
esac

NODE="$(command -v node)" || die "node not found in PATH"

build() { # $1: rebuild | build
  # cmake-js (v7) only uses node-api-headers when the CMake project's own
  # package.json declares binary.napi_versions; native/ has none, so without
  # this it would download the full Node headers. Pointing its nodedir at the
  # installed Node makes it find them locally and never touch the network.
  local prefix inc
  prefix="$("$NODE" -p "require('path').resolve(process.execPath, '..', '..')")"
  inc="$prefix/include/node"
  [[ -f "$inc/uv.h" ]] || die "uv.h not found in $inc (Node prefix from process.execPath: $prefix).
  native/fault_reader.h needs libuv's headers, which node-api-headers lacks; they ship with
  Node's headers (official tarballs, nvm; on Debian/Ubuntu the nodejs/libnode-dev package)."
  [[ -f "$inc/node.h" ]] || die "node.h not found in $inc: cmake-js would try to download Node's headers."
  echo "test-asan: building $ADDON (Node headers for uv.h: $inc)" >&2
  npm_config_nodedir="$prefix" "$NODE" "$ROOT/node_modules/cmake-js/bin/cmake-js" "$1" \
    --debug --directory "$ROOT/native" --out "$OUT" \
    --CDNODE_EXECUTABLE="$NODE" --CDNODE_UV_INCLUDE_DIR="$inc"
  [[ -f "$ADDON" ]] || die "build finished but $ADDON is missing"
}

case "$mode" in
  build) build rebuild; exit 0 ;;
  rebuild) build rebuild ;;
  # `cmake-js build` is incremental: configures once, then only recompiles what changed.
  test) build build ;;
esac

# The .node must really be instrumented, else the run below proves nothing.
readelf -d "$ADDON" | grep -q 'NEEDED.*libasan' || die "$ADDON does not link libasan"

"$NODE" node_modules/typescript/bin/tsc -p tsconfig.json

# Node is not instrumented, so the ASan runtime must be loaded first (preloaded);
# libubsan is loaded as the addon's dependency. Everything vitest spawns
# (fork pool, worker_threads, child processes) inherits these.
LIBASAN="$(gcc -print-file-name=libasan.so)"
[[ -f "$LIBASAN" ]] || die "libasan.so not found (gcc -print-file-name=libasan.so gave '$LIBASAN')"
export LD_PRELOAD="$LIBASAN${LD_PRELOAD:+:$LD_PRELOAD}"
# detect_leaks=0: V8 and Node keep their allocations until exit by design.
# Signals are left at ASan's defaults: Node then installs its own SIGSEGV
# handler over ASan's (wasm bounds-check traps keep working: undici's llhttp,
# es-module-lexer), so a SEGV in native code ends as a bare signal-11 crash.
# To get ASan's report and stack for it, rerun with
#   ASAN_OPTIONS=allow_user_segv_handler=0 npm run test:asan -- <file>
# (that breaks wasm out-of-bounds traps, which normal runs never hit).
export ASAN_OPTIONS="detect_leaks=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
# Any UB report fails the run (the process exits) instead of scrolling by.
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export UFFD_MIGRATE_ADDON="$ADDON"

# Preflight: the tests skip (loudly) when the addon cannot load, so make sure
# this one loads, sanitizer runtime and all, before trusting a green run.
"$NODE" -e '
  const b = require(process.env.UFFD_MIGRATE_ADDON)
  if (typeof b.pageSize !== "number") throw new Error("addon loaded without its exports")
  const maps = require("fs").readFileSync("/proc/self/maps", "utf8")
  for (const lib of ["libasan.so", "libubsan.so", process.env.UFFD_MIGRATE_ADDON])
    if (!maps.includes(lib)) throw new Error(lib + " is not mapped")
' || die "$ADDON does not load under the sanitizer (see above)"

echo "test-asan: vitest with UFFD_MIGRATE_ADDON=$ADDON LD_PRELOAD=$LD_PRELOAD" >&2
# One test file at a time: the sanitizer slows the addon several-fold, and the
# e2e tests' bounds (e.g. the client's gap around the hand-off) are about the
# migration, not about two files' migrations sharing two CPUs.
exec "$NODE" node_modules/vitest/vitest.mjs run --no-file-parallelism "$@"
