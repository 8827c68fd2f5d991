#include "uffd_registry.h"

#include <errno.h>
#include <sys/mman.h>

#include <map>
#include <mutex>

#include "region.h"
#include "uffd.h"

namespace uffdm {

namespace {
std::mutex g_mu;  // held across the ioctls of a fill: a descriptor is not closed under it
std::map<uint32_t, int> g_holder;
constexpr int kRefills = 4;  // a page is pushed at most once after the hand-off: one refill is the most expected
}  // namespace

void registry_set(uint32_t region_id, int fd) {
  std::lock_guard<std::mutex> lock(g_mu);
  g_holder[region_id] = fd;
}

void registry_replace(int fd, int replacement) {
  if (fd < 0) return;
  std::lock_guard<std::mutex> lock(g_mu);
  for (auto it = g_holder.begin(); it != g_holder.end();) {
    if (it->second != fd) {
      ++it;
    } else if (replacement >= 0) {
      (it++)->second = replacement;
    } else {
      it = g_holder.erase(it);
    }
  }
}

void registry_drop(uint32_t region_id, int fd) {
  std::lock_guard<std::mutex> lock(g_mu);
  auto it = g_holder.find(region_id);
  if (it != g_holder.end() && it->second == fd) g_holder.erase(it);
}

int64_t zero_fill_registered(uint32_t region_id, uintptr_t addr, size_t len) {
  std::lock_guard<std::mutex> lock(g_mu);
  auto it = g_holder.find(region_id);
  if (it == g_holder.end()) return -1;
  const int fd = it->second;
  const size_t ps = page_size();
  int64_t filled = 0;
  for (int round = 0; round < kRefills && len > 0; round++) {
    if (madvise((void*)addr, len, MADV_DONTNEED)) return -errno;
    // ZEROPAGE stops at a page that is there (EEXIST: placed by another thread since the drop): step over it and
    // drop it in the next round; EAGAIN (the address space changing): go on from where the kernel stopped
    uintptr_t redo_first = 0, redo_end = 0, done = 0;
    int again = 0;
    while (done < len) {
      int64_t zeroed = 0;
      int e = uffd_zeropage(fd, addr + done, len - done, true, &zeroed);
      if (zeroed > 0) filled += zeroed / (int64_t)ps, done += (uintptr_t)zeroed;
      if (e == 0) break;
      if (e == -EEXIST && zeroed <= 0) {
        if (!redo_end) redo_first = addr + done;
        redo_end = addr + done + ps;
        done += ps;
      } else if (e != -EAGAIN || (zeroed <= 0 && ++again > 1000)) {
        return e;
      }
    }
    if (!redo_end) return filled;
    addr = redo_first, len = redo_end - redo_first;
  }
  return filled;
}

}  // namespace uffdm
