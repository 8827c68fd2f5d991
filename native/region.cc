#include "region.h"

#include <errno.h>
#include <sys/mman.h>
#include <unistd.h>

#include <map>
#include <mutex>

namespace uffdm {

namespace {
std::mutex g_mu;
uint32_t g_next_id = 1;
std::map<uint32_t, std::weak_ptr<Mapping>> g_by_id;
std::map<uintptr_t, std::weak_ptr<Mapping>> g_by_addr;  // keyed by start address
}  // namespace

size_t page_size() {
  static size_t ps = (size_t)sysconf(_SC_PAGESIZE);
  return ps;
}

Mapping::~Mapping() {
  {
    std::lock_guard<std::mutex> lock(g_mu);
    auto it = g_by_addr.find(addr());
    if (it != g_by_addr.end() && it->second.expired()) g_by_addr.erase(it);
    auto jt = g_by_id.find(id);
    if (jt != g_by_id.end() && jt->second.expired()) g_by_id.erase(jt);
  }
  munmap(base, size);
}

std::shared_ptr<Mapping> region_create(size_t bytes, int* err) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    *err = -errno;
    return nullptr;
  }
  auto m = std::make_shared<Mapping>();
  m->base = (uint8_t*)p;
  m->size = bytes;
  std::lock_guard<std::mutex> lock(g_mu);
  m->id = g_next_id++;
  g_by_id[m->id] = m;
  g_by_addr[m->addr()] = m;
  return m;
}

std::shared_ptr<Mapping> region_find(uint32_t id) {
  std::lock_guard<std::mutex> lock(g_mu);
  auto it = g_by_id.find(id);
  return it == g_by_id.end() ? nullptr : it->second.lock();
}

std::shared_ptr<Mapping> region_find_addr(uintptr_t addr) {
  std::lock_guard<std::mutex> lock(g_mu);
  auto it = g_by_addr.upper_bound(addr);
  if (it == g_by_addr.begin()) return nullptr;
  --it;
  auto m = it->second.lock();
  if (!m || addr >= m->addr() + m->size) return nullptr;
  return m;
}

void region_forget(uint32_t id) {
  std::lock_guard<std::mutex> lock(g_mu);
  g_by_id.erase(id);
}

}  // namespace uffdm
