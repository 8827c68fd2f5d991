#include "discard.h"

#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <mutex>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_process_madvise
#define SYS_process_madvise 440
#endif

namespace uffdm {

namespace {

// Our own pidfd, opened once; -1 when process_madvise cannot drop pages here (then it is never tried again).
std::atomic<int> g_pidfd{-2};
std::mutex g_open;

int self_pidfd() {
  int fd = g_pidfd.load();
  if (fd != -2) return fd;
  std::lock_guard<std::mutex> lock(g_open);
  if ((fd = g_pidfd.load()) == -2) {
    // UFFD_MIGRATE_DISCARD=madvise: one call per range (for comparison, or a kernel where the batch misbehaves)
    const char* how = getenv("UFFD_MIGRATE_DISCARD");
    fd = how && !strcmp(how, "madvise") ? -1 : (int)syscall(SYS_pidfd_open, getpid(), 0);
    g_pidfd = fd < 0 ? -1 : fd;
  }
  return g_pidfd.load();
}

int madvise_each(const iovec* iov, size_t n, size_t* syscalls) {
  int first_err = 0;
  for (size_t i = 0; i < n; i++) {
    if (syscalls) (*syscalls)++;
    if (madvise(iov[i].iov_base, iov[i].iov_len, MADV_DONTNEED) && !first_err) first_err = -errno;
  }
  return first_err;
}

}  // namespace

int discard_ranges(const std::vector<iovec>& ranges, size_t* syscalls) {
  const size_t kMax = IOV_MAX;
  int first_err = 0;
  for (size_t at = 0; at < ranges.size(); at += kMax) {
    size_t n = std::min(kMax, ranges.size() - at);
    const iovec* iov = ranges.data() + at;
    int fd = n > 1 ? self_pidfd() : -1;
    if (fd >= 0) {
      size_t want = 0;
      for (size_t i = 0; i < n; i++) want += iov[i].iov_len;
      if (syscalls) (*syscalls)++;
      long done = syscall(SYS_process_madvise, fd, iov, n, MADV_DONTNEED, 0);
      if (done == (long)want) continue;
      if (done < 0 && (errno == EINVAL || errno == ENOSYS || errno == EPERM)) {
        g_pidfd = -1;  // this kernel does not allow it: madvise from now on
        close(fd);
      }
      // refused or stopped short: what it did is done; MADV_DONTNEED is idempotent, so the loop redoes the lot
    }
    int e = madvise_each(iov, n, syscalls);
    if (e && !first_err) first_err = e;
  }
  return first_err;
}

}  // namespace uffdm
