#include "pagemap.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <system_error>
#include <thread>

#include "kernel_compat.h"
#include "region.h"

namespace uffdm {

static int pagemap_fd(int* err) {
  static std::once_flag once;
  static int fd = -1, open_err = 0;
  std::call_once(once, [] {
    fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (fd < 0) open_err = -errno;
  });
  *err = open_err;
  return fd;
}

int pagemap_scan(uintptr_t base, size_t first_page, size_t npages, const ScanSpec& spec,
                 std::vector<uint32_t>* out) {
  int err;
  int fd = pagemap_fd(&err);
  if (fd < 0) return err;
  const size_t ps = page_size();
  constexpr size_t kVec = 4096;
  thread_local std::vector<page_region> vec(kVec);
  uint64_t s = base + first_page * ps, e = s + npages * ps;
  while (s < e) {
    pm_scan_arg a = {};
    a.size = sizeof(a);
    a.flags = spec.flags;
    a.start = s;
    a.end = e;
    a.vec = (uintptr_t)vec.data();
    a.vec_len = kVec;
    a.category_mask = spec.category_mask;
    a.category_inverted = spec.category_inverted;
    a.category_anyof_mask = spec.category_anyof;
    a.return_mask = spec.return_mask;
    long n = ioctl(fd, PAGEMAP_SCAN, &a);
    if (n < 0) return -errno;
    for (long i = 0; i < n; i++) {
      // The kernel may split one run across two vec entries: append_run merges them.
      append_run(out, (uint32_t)((vec[i].start - base) / ps), (uint32_t)((vec[i].end - vec[i].start) / ps));
    }
    // Only a full vec means "more": walk_end can be stale after a complete
    // walk on some kernels (see the limits' b4_wp.c).
    if ((size_t)n < kVec) break;
    if (a.walk_end <= s) return -EIO;
    s = a.walk_end;
  }
  return 0;
}

namespace {

// One split walk: chunks taken in turn by the caller and its helpers. The caller never waits for a helper that has
// not started (on a VM an idle vCPU may take long to wake): it walks every chunk nobody took, and then waits only for
// chunks a running helper is walking. Helpers are detached and share this by shared_ptr: one that starts after the
// caller returned finds nothing left and ends.
struct SplitScan {
  uintptr_t base;
  size_t first_page, npages, chunks;
  ScanSpec spec;
  std::vector<std::vector<uint32_t>> runs;  // per chunk
  std::vector<int> errs;
  std::atomic<size_t> next{0};
  std::mutex mu;
  std::condition_variable all_done;
  size_t done = 0;

  // Walks chunks until none is left (the caller, then each helper as it starts).
  void work() {
    for (size_t k; (k = next.fetch_add(1)) < chunks;) {
      size_t from = k * npages / chunks, to = (k + 1) * npages / chunks;
      errs[k] = pagemap_scan(base, first_page + from, to - from, spec, &runs[k]);
      std::lock_guard<std::mutex> lock(mu);
      if (++done == chunks) all_done.notify_all();
    }
  }
};

}  // namespace

int pagemap_scan_parallel(uintptr_t base, size_t first_page, size_t npages, const ScanSpec& spec,
                          std::vector<uint32_t>* out, unsigned threads) {
  size_t helpers = std::min<size_t>(threads, npages / kMinPagesPerScanThread);
  if (helpers <= 1) return pagemap_scan(base, first_page, npages, spec, out);
  helpers -= 1;
  auto job = std::make_shared<SplitScan>();
  job->base = base, job->first_page = first_page, job->npages = npages, job->spec = spec;
  job->chunks = std::max<size_t>(1, npages / kPagesPerScanChunk);
  job->runs.resize(job->chunks);
  job->errs.assign(job->chunks, 0);
  for (size_t h = 0; h < helpers; h++) {
    try {
      std::thread([job] { job->work(); }).detach();
    } catch (const std::system_error&) {
      break;  // no thread to be had: this one walks it all
    }
  }
  job->work();
  {
    std::unique_lock<std::mutex> lock(job->mu);
    job->all_done.wait(lock, [&] { return job->done == job->chunks; });
  }
  for (size_t k = 0; k < job->chunks; k++) {
    if (job->errs[k]) return job->errs[k];
    // a run cut at a chunk's edge is joined again (append_run merges touching runs)
    for (size_t i = 0; i < job->runs[k].size(); i += 2) append_run(out, job->runs[k][i], job->runs[k][i + 1]);
  }
  return 0;
}

int pagemap_protect_all(uintptr_t base, size_t npages) {
  int err;
  int fd = pagemap_fd(&err);
  if (fd < 0) return err;
  pm_scan_arg a = {};
  a.size = sizeof(a);
  a.flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC;
  a.start = base;
  a.end = base + npages * page_size();
  return ioctl(fd, PAGEMAP_SCAN, &a) < 0 ? -errno : 0;
}

int pagemap_present(uintptr_t base, size_t npages, std::vector<uint32_t>* out) {
  int err;
  int fd = pagemap_fd(&err);
  if (fd < 0) return err;
  const size_t ps = page_size();
  constexpr size_t kChunk = 1 << 16;  // entries per read: 512 KiB
  thread_local std::vector<uint64_t> entries(kChunk);
  for (size_t first = 0; first < npages;) {
    size_t n = std::min(kChunk, npages - first);
    ssize_t got = pread(fd, entries.data(), n * 8, (off_t)((base / ps + first) * 8));
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) return got < 0 ? -errno : -EIO;
    size_t read_entries = (size_t)got / 8;
    for (size_t i = 0; i < read_entries; i++)
      if (entries[i] >> 62) append_run(out, (uint32_t)(first + i), 1);  // bit 63 present, bit 62 swapped
    first += read_entries;
  }
  return 0;
}

int pagemap_probe() {
  int err;
  int fd = pagemap_fd(&err);
  if (fd < 0) return err;
  page_region one;
  pm_scan_arg a = {};
  a.size = sizeof(a);
  static char probe_page[1];
  a.start = (uintptr_t)probe_page & ~(uint64_t)(page_size() - 1);
  a.end = a.start + page_size();
  a.vec = (uintptr_t)&one;
  a.vec_len = 1;
  a.category_mask = PAGE_IS_PRESENT;
  a.return_mask = PAGE_IS_PRESENT;
  return ioctl(fd, PAGEMAP_SCAN, &a) < 0 ? -errno : 0;
}

}  // namespace uffdm
