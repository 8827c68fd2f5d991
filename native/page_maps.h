// Pieces the native threads share: page bitmaps owned by JS and updated
// atomically (a bit is set only after its page is in), the regions as both
// sides agreed on them, big-endian frame fields, waiting on a socket.
#pragma once
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "region.h"
#include "uffd.h"

namespace uffdm {

inline double now_us() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

inline void put_u32(uint8_t* p, uint32_t v) {
  p[0] = v >> 24, p[1] = v >> 16, p[2] = v >> 8, p[3] = v;
}
inline uint32_t get_u32(const uint8_t* p) {
  return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

// All bytes of the page are zero (read 64 bytes at a time; stops at the first non-zero line).
inline bool page_is_zero(const uint8_t* p, size_t ps) {
  const uint64_t* w = (const uint64_t*)p;
  uint64_t acc = 0;
  for (size_t i = 0; i < ps / 8; i += 8) {
    acc |= w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7];
    if (acc) return false;
  }
  return true;
}

// One region as both sides agreed: where it is here and how many pages it has;
// bits: a page bitmap owned by JS (one bit per page, u32 words, host order).
struct RegionView {
  std::shared_ptr<Mapping> m;
  uint32_t pages = 0;
  uint32_t* bits = nullptr;
  bool test(uint32_t p) const { return __atomic_load_n(&bits[p >> 5], __ATOMIC_ACQUIRE) & (1u << (p & 31)); }
};

// Clears the bits of [first, first+count) that are set; calls fn(p, q) for each run of pages that were set.
template <typename Fn>
inline void take_runs(uint32_t* bits, uint32_t first, uint32_t count, Fn fn) {
  uint32_t end = first + count, run = UINT32_MAX;
  for (uint32_t p = first; p < end;) {
    uint32_t w = p >> 5, lo = p & 31, hi = std::min<uint32_t>(32, lo + (end - p));
    uint32_t mask = (hi == 32 ? ~0u : ((1u << hi) - 1)) & ~((1u << lo) - 1);
    uint32_t old = __atomic_fetch_and(&bits[w], ~mask, __ATOMIC_ACQ_REL) & mask;
    for (uint32_t b = lo; b < hi; b++) {
      bool had = old & (1u << b);
      uint32_t page = (w << 5) + b;
      if (had && run == UINT32_MAX) run = page;
      if (!had && run != UINT32_MAX) fn(run, page), run = UINT32_MAX;
    }
    p = (w << 5) + hi;
  }
  if (run != UINT32_MAX) fn(run, end);
}

// Sets the bits of [first, first+count); returns how many were clear.
inline uint32_t set_range(uint32_t* bits, uint32_t first, uint32_t count) {
  uint32_t end = first + count, newly = 0;
  for (uint32_t p = first; p < end;) {
    uint32_t w = p >> 5, lo = p & 31, hi = std::min<uint32_t>(32, lo + (end - p));
    uint32_t mask = (hi == 32 ? ~0u : ((1u << hi) - 1)) & ~((1u << lo) - 1);
    newly += __builtin_popcount(~__atomic_fetch_or(&bits[w], mask, __ATOMIC_ACQ_REL) & mask);
    p = (w << 5) + hi;
  }
  return newly;
}

// Clears the bits of [first, first+count); returns how many were set.
inline uint32_t clear_range(uint32_t* bits, uint32_t first, uint32_t count) {
  uint32_t end = first + count, cleared = 0;
  for (uint32_t p = first; p < end;) {
    uint32_t w = p >> 5, lo = p & 31, hi = std::min<uint32_t>(32, lo + (end - p));
    uint32_t mask = (hi == 32 ? ~0u : ((1u << hi) - 1)) & ~((1u << lo) - 1);
    cleared += __builtin_popcount(__atomic_fetch_and(&bits[w], ~mask, __ATOMIC_ACQ_REL) & mask);
    p = (w << 5) + hi;
  }
  return cleared;
}

// Waits until fd is ready for `events`, the stop eventfd fires or timeout_ms passes (-1: no timeout); false
// when stopping.
inline bool wait_fd(int fd, short events, int stop_fd, int timeout_ms = -1) {
  pollfd p[2] = {{fd, events, 0}, {stop_fd, POLLIN, 0}};
  for (;;) {
    int r = poll(p, 2, timeout_ms);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return false;
    if (p[1].revents) return false;
    return true;
  }
}

// A frame's remaining parts, read with one readv where the bytes are there.
struct ReadPart {
  uint8_t* dst;
  size_t* have;
  size_t need;
};

// Fills parts in order with one readv, which also takes up to extra_need bytes of what follows them (the next
// frame's prefix: callers ask for no more than the shortest frame, so nothing past the next frame is read): one
// syscall per frame instead of three. 1 = the parts are complete (*extra_have: how much of the extra came along;
// it gets bytes only then); 2 = the same, and the readv found fewer bytes than it asked for, so the socket is
// drained: poll before reading again rather than a read that fails with EAGAIN; 0 = not complete (it would block,
// or the readv came back short: drained as well); -EPIPE = end of stream; -errno = failed. counter adds the bytes
// read.
constexpr int kMaxReadParts = 3;
inline int read_parts(int fd, const ReadPart* parts, int n, uint8_t* extra, size_t* extra_have, size_t extra_need,
                      std::atomic<uint64_t>* counter = nullptr) {
  if (n > kMaxReadParts) return -EINVAL;  // callers pass a header and a body
  iovec iov[kMaxReadParts + 1];
  int k = 0;
  size_t asked = 0;
  for (int i = 0; i < n; i++)
    if (*parts[i].have < parts[i].need) iov[k++] = {parts[i].dst + *parts[i].have, parts[i].need - *parts[i].have};
  if (k == 0) return 1;
  if (extra && *extra_have < extra_need) iov[k++] = {extra + *extra_have, extra_need - *extra_have};
  for (int i = 0; i < k; i++) asked += iov[i].iov_len;
  ssize_t r;
  while ((r = readv(fd, iov, k)) < 0 && errno == EINTR) {
  }
  if (r == 0) return -EPIPE;
  if (r < 0) return errno == EAGAIN ? 0 : -errno;
  if (counter) *counter += (uint64_t)r;
  size_t left = (size_t)r;
  bool complete = true;
  for (int i = 0; i < n; i++) {
    size_t t = std::min(left, parts[i].need - *parts[i].have);
    *parts[i].have += t, left -= t;
    complete &= *parts[i].have == parts[i].need;
  }
  if (extra) *extra_have += left;
  if (!complete) return 0;  // short: the socket is drained, a second readv would only fail with EAGAIN
  return (size_t)r < asked ? 2 : 1;
}

// Testing the failure path (CRIU's CRIU_FAULT in spirit): UFFD_MIGRATE_FAULT_INJECT=install:N makes the Nth
// install of this process (a run of pages), and every one after it, fail with ENOMEM at once, as a destination
// whose memory cgroup is full would. Read once.
inline bool install_fault_injected() {
  static const long nth = [] {
    const char* v = getenv("UFFD_MIGRATE_FAULT_INJECT");
    return v && strncmp(v, "install:", 8) == 0 ? atol(v + 8) : 0L;
  }();
  static std::atomic<long> calls{0};
  return nth > 0 && calls.fetch_add(1, std::memory_order_relaxed) + 1 >= nth;
}

// An event every thread that installs pages sends when it cannot: (errno, region, first page, pages). The pages
// are not marked received; JS fails the migration (a service thread blocked on them would never be woken).
constexpr int kEvInstallFailed = 12;

// UFFDIO_COPY (src) or UFFDIO_ZEROPAGE (src == nullptr) of [dst, dst+len), waking the faulting threads; a page
// placed meanwhile is kept, ENOMEM waited out (uffd_fill()). 0 when every page is in; else the -errno that stopped
// it, and the caller must not mark the pages received.
inline int install_pages(int uffd, uintptr_t dst, const uint8_t* src, size_t len, const std::atomic<bool>* stopping = nullptr) {
  if (install_fault_injected()) return -ENOMEM;
  UffdFill f;
  f.src = src, f.wait_for_memory = true, f.stopping = stopping;
  return uffd_fill(uffd, dst, len, &f);
}

}  // namespace uffdm
