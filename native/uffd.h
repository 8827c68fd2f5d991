// One small function per userfaultfd ioctl, and uffd_fill(), the one walk of
// a range through COPY/ZEROPAGE's partial progress that every placer uses.
// Each returns 0 (or a count) on success and -errno on failure; policy lives
// in TypeScript.
#pragma once
#include <cstddef>
#include <atomic>
#include <cstdint>
#include "kernel_compat.h"

namespace uffdm {

// Opens a userfaultfd (syscall first, then /dev/userfaultfd). On failure
// returns -errno and sets *syscall_name to the call that failed.
int uffd_open(bool nonblock, const char** syscall_name);
// UFFDIO_API handshake. requested: features wanted; *supported: what the kernel offers.
int uffd_api(int fd, uint64_t requested, uint64_t* features_out, uint64_t* ioctls_out);
// Probe the kernel's feature set on a throwaway fd.
int uffd_probe_features(uint64_t* features, uint64_t* ioctls, const char** syscall_name);
int uffd_register(int fd, uintptr_t start, size_t len, uint64_t mode, uint64_t* ioctls_out);
int uffd_unregister(int fd, uintptr_t start, size_t len);
// Copies len bytes; on partial progress *copied holds the bytes done.
int uffd_copy(int fd, uintptr_t dst, const void* src, size_t len, bool wake, int64_t* copied);
int uffd_zeropage(int fd, uintptr_t dst, size_t len, bool wake, int64_t* zeroed);
int uffd_wake(int fd, uintptr_t start, size_t len);

// How uffd_fill() walks a range, and what it reports.
struct UffdFill {
  const uint8_t* src = nullptr;  // UFFDIO_COPY from here; nullptr: UFFDIO_ZEROPAGE
  bool wake = true;              // wake the threads faulting on the range (and on a page already there)
  // ENOMEM (memory short for a moment) retried for ~200 ms, unless *stopping turns true (a thread being closed is
  // joined on the JS thread, which must not wait that long); without it ENOMEM stops the walk
  bool wait_for_memory = false;
  const std::atomic<bool>* stopping = nullptr;
  // Called for each page already there (EEXIST: placed by another thread), which the walk steps over.
  void (*on_existing)(void* ctx, uintptr_t page) = nullptr;
  void* ctx = nullptr;
  int64_t placed_bytes = 0;  // out: bytes this call placed
};
// UFFDIO_COPY or UFFDIO_ZEROPAGE of [dst, dst+len) through the kernel's partial progress: EEXIST (a page
// placed meanwhile: stepped over, and woken when f->wake, since a fault may have come after its placer's wake),
// EAGAIN (the address space changing, or a partial copy: retried, up to 1000 times in a row without progress),
// ENOMEM (see wait_for_memory). 0 when the whole range is walked, else the -errno that stopped it.
int uffd_fill(int fd, uintptr_t dst, size_t len, UffdFill* f);
int uffd_writeprotect(int fd, uintptr_t start, size_t len, bool protect, bool wake);

}  // namespace uffdm
