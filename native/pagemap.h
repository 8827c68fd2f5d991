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
// pagemap_scan() split over up to `threads` threads (the caller and threads - 1 others), one for each
// kMinPagesPerScanThread pages, walking chunks of kPagesPerScanChunk in turn: for a read-only walk of much memory while
// nothing else wants the CPUs (the hand-off's final scan, the service paused). The runs are one pagemap_scan()'s.
constexpr size_t kMinPagesPerScanThread = 1u << 17;  // 512 MiB of 4 KiB pages: below that a thread's start costs more
constexpr size_t kPagesPerScanChunk = 1u << 16;      // 256 MiB: ~0.1 ms, what the caller may wait for a helper's last
int pagemap_scan_parallel(uintptr_t base, size_t first_page, size_t npages, const ScanSpec& spec,
                          std::vector<uint32_t>* out, unsigned threads);
// 0 when PAGEMAP_SCAN works on this kernel, else -errno.
int pagemap_probe();

// Write-protects every page of [base, base + npages pages), present or not: PAGEMAP_SCAN with WP_MATCHING, a filter
// that matches every page and no output vector (the kernel's exclusive write-protect path). The range must be
// registered for WP with UFFD_FEATURE_WP_ASYNC (and WP_UNPOPULATED for the holes). 0 or -errno.
int pagemap_protect_all(uintptr_t base, size_t npages);

// Appends runs of the pages that hold memory (present or swapped), from /proc/self/pagemap entries read in bulk
// (any kernel: the sync-wp tracker's round 0). Returns 0 or -errno.
int pagemap_present(uintptr_t base, size_t npages, std::vector<uint32_t>* out);

// Appends the run [first, first+count) to out, merged with the last run when they touch.
inline void append_run(std::vector<uint32_t>* out, uint32_t first, uint32_t count) {
  size_t k = out->size();
  if (k >= 2 && (*out)[k - 2] + (*out)[k - 1] == first) (*out)[k - 1] += count;
  else out->push_back(first), out->push_back(count);
}

}  // namespace uffdm
