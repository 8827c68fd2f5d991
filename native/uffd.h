// One small function per userfaultfd ioctl. Each returns 0 (or a count) on
// success and -errno on failure; policy lives in TypeScript.
#pragma once
#include <cstddef>
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
int uffd_writeprotect(int fd, uintptr_t start, size_t len, bool protect, bool wake);

}  // namespace uffdm
