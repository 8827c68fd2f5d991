#include "uffd.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "region.h"

namespace uffdm {

static int xioctl(int fd, unsigned long req, void* arg) {
  return ioctl(fd, req, arg) == 0 ? 0 : -errno;
}

int uffd_open(bool nonblock, const char** syscall_name) {
  int flags = O_CLOEXEC | (nonblock ? O_NONBLOCK : 0);
  int fd = (int)syscall(SYS_userfaultfd, flags);
  if (fd >= 0) return fd;
  int first = errno;
  // Without vm.unprivileged_userfaultfd or CAP_SYS_PTRACE the syscall says
  // EPERM, but /dev/userfaultfd may still be open to this user.
  int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
  if (dev >= 0) {
    fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
    int e = errno;
    close(dev);
    if (fd >= 0) return fd;
    if (syscall_name) *syscall_name = "ioctl(USERFAULTFD_IOC_NEW)";
    return -e;
  }
  if (syscall_name) *syscall_name = "userfaultfd";
  return -first;
}

int uffd_api(int fd, uint64_t requested, uint64_t* features_out, uint64_t* ioctls_out) {
  struct uffdio_api api = {};
  api.api = UFFD_API;
  api.features = requested;
  int r = xioctl(fd, UFFDIO_API, &api);
  if (r) return r;
  if (features_out) *features_out = api.features;
  if (ioctls_out) *ioctls_out = api.ioctls;
  return 0;
}

int uffd_probe_features(uint64_t* features, uint64_t* ioctls, const char** syscall_name) {
  int fd = uffd_open(false, syscall_name);
  if (fd < 0) return fd;
  // features=0 asks for nothing; the kernel answers with everything it has.
  int r = uffd_api(fd, 0, features, ioctls);
  if (r && syscall_name) *syscall_name = "ioctl(UFFDIO_API)";
  close(fd);
  return r;
}

int uffd_register(int fd, uintptr_t start, size_t len, uint64_t mode, uint64_t* ioctls_out) {
  struct uffdio_register reg = {};
  reg.range.start = start;
  reg.range.len = len;
  reg.mode = mode;
  int r = xioctl(fd, UFFDIO_REGISTER, &reg);
  if (!r && ioctls_out) *ioctls_out = reg.ioctls;
  return r;
}

int uffd_unregister(int fd, uintptr_t start, size_t len) {
  struct uffdio_range range = {start, len};
  return xioctl(fd, UFFDIO_UNREGISTER, &range);
}

int uffd_copy(int fd, uintptr_t dst, const void* src, size_t len, bool wake, int64_t* copied) {
  struct uffdio_copy c = {};
  c.dst = dst;
  c.src = (uintptr_t)src;
  c.len = len;
  c.mode = wake ? 0 : UFFDIO_COPY_MODE_DONTWAKE;
  int r = xioctl(fd, UFFDIO_COPY, &c);
  *copied = c.copy;  // bytes copied, or -errno when nothing was
  return r;
}

int uffd_zeropage(int fd, uintptr_t dst, size_t len, bool wake, int64_t* zeroed) {
  struct uffdio_zeropage z = {};
  z.range.start = dst;
  z.range.len = len;
  z.mode = wake ? 0 : UFFDIO_ZEROPAGE_MODE_DONTWAKE;
  int r = xioctl(fd, UFFDIO_ZEROPAGE, &z);
  *zeroed = z.zeropage;
  return r;
}

int uffd_fill(int fd, uintptr_t dst, size_t len, UffdFill* f) {
  const size_t ps = page_size();
  size_t done = 0;
  int again = 0, short_of_memory = 0;
  while (done < len) {
    int64_t progressed = 0;
    int e = f->src ? uffd_copy(fd, dst + done, f->src + done, len - done, f->wake, &progressed)
                   : uffd_zeropage(fd, dst + done, len - done, f->wake, &progressed);
    if (progressed > 0) {
      done += (size_t)progressed, f->placed_bytes += progressed;
      again = 0;
    }
    if (e == 0) break;
    if (e == -EEXIST) {
      if (progressed > 0) continue;  // the page it stopped at is looked at again alone
      if (f->wake) uffd_wake(fd, dst + done, ps);
      if (f->on_existing) f->on_existing(f->ctx, dst + done);
      done += ps;
    } else if (e == -EAGAIN) {
      if (progressed <= 0 && ++again > 1000) return e;
    } else if (e == -ENOMEM && f->wait_for_memory) {
      if (++short_of_memory > 200 || (f->stopping && f->stopping->load(std::memory_order_relaxed))) return e;
      usleep(1000);
    } else {
      return e;
    }
  }
  return 0;
}

int uffd_wake(int fd, uintptr_t start, size_t len) {
  struct uffdio_range range = {start, len};
  return xioctl(fd, UFFDIO_WAKE, &range);
}

int uffd_writeprotect(int fd, uintptr_t start, size_t len, bool protect, bool wake) {
  struct uffdio_writeprotect wp = {};
  wp.range.start = start;
  wp.range.len = len;
  wp.mode = (protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0) | (wake ? 0 : UFFDIO_WRITEPROTECT_MODE_DONTWAKE);
  return xioctl(fd, UFFDIO_WRITEPROTECT, &wp);
}

}  // namespace uffdm
