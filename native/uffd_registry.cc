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
  // a page another thread placed between the drop and the fill (EEXIST) is noted and dropped in the next round
  struct Redo {
    uintptr_t first = 0, end = 0;
  } redo;
  int64_t filled_bytes = 0;
  for (int round = 0; round < kRefills && len > 0; round++) {
    if (madvise((void*)addr, len, MADV_DONTNEED)) return -errno;
    UffdFill f;
    f.ctx = &redo;
    f.on_existing = [](void* ctx, uintptr_t page) {
      Redo* r = (Redo*)ctx;
      if (!r->end) r->first = page;
      r->end = page + page_size();
    };
    int e = uffd_fill(fd, addr, len, &f);
    filled_bytes += f.placed_bytes;
    if (e) return e;
    if (!redo.end) break;
    addr = redo.first, len = redo.end - redo.first;
    redo = Redo{};
  }
  return filled_bytes / (int64_t)page_size();
}

}  // namespace uffdm
