// Guest memory regions: anonymous private mappings shared by every thread of
// the process. A process-wide registry maps ids and addresses to mappings; a
// mapping is unmapped when its last holder (a JS view or an in-flight call)
// lets go.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>

namespace uffdm {

struct Mapping {
  uint32_t id;
  uint8_t* base;
  size_t size;
  ~Mapping();
  uintptr_t addr() const { return (uintptr_t)base; }
};

// mmap(MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE). Returns nullptr and sets *err (-errno).
std::shared_ptr<Mapping> region_create(size_t bytes, int* err);
std::shared_ptr<Mapping> region_find(uint32_t id);
// The mapping that contains addr, if any.
std::shared_ptr<Mapping> region_find_addr(uintptr_t addr);
// Forget the id: no new views may be opened; memory stays until the last holder goes.
void region_forget(uint32_t id);

size_t page_size();

}  // namespace uffdm
