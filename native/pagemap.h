// PAGEMAP_SCAN over a range of a region, returned as page runs.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace uffdm {

struct ScanSpec {
  uint64_t flags;             // PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC
  uint64_t category_mask;     // all of these must match (after inversion)
  uint64_t category_inverted;
  uint64_t category_anyof;
  uint64_t return_mask;
};

// Appends runs (first page index relative to base, page count) to out.
// Returns 0 or -errno.
int pagemap_scan(uintptr_t base, size_t first_page, size_t npages, const ScanSpec& spec,
                 std::vector<uint32_t>* out);
// 0 when PAGEMAP_SCAN works on this kernel, else -errno.
int pagemap_probe();

}  // namespace uffdm
