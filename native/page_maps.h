// Pieces the native threads share: page bitmaps owned by JS and updated
// atomically (a bit is set only after its page is in), the regions as both
// sides agreed on them, big-endian frame fields, waiting on a socket.
#pragma once
#include <errno.h>
#include <poll.h>
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

// Waits until fd is ready for `events` or the stop eventfd fires; false when stopping.
inline bool wait_fd(int fd, short events, int stop_fd) {
  pollfd p[2] = {{fd, events, 0}, {stop_fd, POLLIN, 0}};
  for (;;) {
    int r = poll(p, 2, -1);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return false;
    if (p[1].revents) return false;
    return true;
  }
}

// Reads a non-blocking socket into dst until *have reaches need: 1 = complete, 0 = it would block (call again
// when readable), -EPIPE = end of stream, -errno = failed. counter (optional) adds the bytes read.
inline int read_fill(int fd, uint8_t* dst, size_t* have, size_t need, std::atomic<uint64_t>* counter = nullptr) {
  while (*have < need) {
    ssize_t n = read(fd, dst + *have, need - *have);
    if (n == 0) return -EPIPE;
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno == EAGAIN ? 0 : -errno;
    }
    *have += (size_t)n;
    if (counter) *counter += (uint64_t)n;
  }
  return 1;
}

// UFFDIO_COPY (src) or UFFDIO_ZEROPAGE (src == nullptr) of [dst, dst+len), waking the faulting threads, through
// EEXIST (a page placed meanwhile, by another thread: kept) and EAGAIN (the address space changing: retried).
inline void install_pages(int uffd, uintptr_t dst, const uint8_t* src, size_t len) {
  const size_t ps = page_size();
  size_t done = 0;
  int again = 0;
  while (done < len) {
    int64_t progressed = 0;
    int e = src ? uffd_copy(uffd, dst + done, src + done, len - done, true, &progressed)
                : uffd_zeropage(uffd, dst + done, len - done, true, &progressed);
    if (e == 0) break;
    if (progressed > 0) done += (size_t)progressed;
    if (e == -EEXIST && progressed <= 0) done += ps;
    else if (e == -EAGAIN && progressed <= 0 && ++again > 1000) break;
    else if (e != -EEXIST && e != -EAGAIN) break;
  }
}

}  // namespace uffdm
