// JS class Uffd: one userfaultfd, its registrations, the page-placing
// ioctls and its fault events. Errno policy for UFFDIO_COPY/ZEROPAGE:
// EEXIST = already there (counted, not thrown); EAGAIN = address space
// changing, retry from where the kernel stopped; anything else throws.
#include <errno.h>
#include <fcntl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstring>

#include "args.h"
#include "bindings.h"
#include "errors.h"
#include "fault_reader.h"
#include "pagemap.h"
#include "uffd.h"
#include "uffd_registry.h"

namespace uffdm {

namespace {

class Uffd : public Napi::ObjectWrap<Uffd> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "Uffd",
                       {
                           InstanceMethod("register", &Uffd::Register),
                           InstanceMethod("unregister", &Uffd::Unregister),
                           InstanceMethod("copy", &Uffd::Copy),
                           InstanceMethod("zeropage", &Uffd::Zeropage),
                           InstanceMethod("wake", &Uffd::Wake),
                           InstanceMethod("writeProtect", &Uffd::WriteProtect),
                           InstanceMethod("startFaults", &Uffd::StartFaults),
                           InstanceMethod("stopFaults", &Uffd::StopFaults),
                           InstanceMethod("pollFaults", &Uffd::PollFaults),
                           InstanceMethod("close", &Uffd::Close),
                           InstanceMethod("holdRegistrations", &Uffd::HoldRegistrations),
                           InstanceAccessor("features", &Uffd::Features, nullptr),
                           InstanceAccessor("ioctls", &Uffd::Ioctls, nullptr),
                           InstanceAccessor("fd", &Uffd::Fd, nullptr),
                       });
  }

  // new Uffd(features: number), or new Uffd(features, adoptFd, ioctls): a descriptor a crashed agent held
  // (holdRegistrations()) taken over by the agent that replaces it, with what UFFDIO_API answered then (the API
  // handshake is once per userfaultfd); this object owns it from now on.
  explicit Uffd(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Uffd>(info) {
    auto env = info.Env();
    uint64_t want = arg_index(info, 0, "features", 4294967295.0);
    if (info.Length() > 1 && !info[1].IsUndefined()) {
      int fd = (int)arg_index(info, 1, "adoptFd", 1 << 30);
      if (!is_userfaultfd(fd)) throw Napi::TypeError::New(env, "expected adoptFd to be an open userfaultfd (" + std::to_string(fd) + " is not)");
      fd_ = fd;
      features_ = want;
      ioctls_ = arg_index(info, 2, "ioctls", 4294967295.0);
      napi_add_env_cleanup_hook(env, &Uffd::Cleanup, this);
      return;
    }
    const char* call = "userfaultfd";
    fd_ = uffd_open(true, &call);
    if (fd_ < 0) throw sys_error(env, fd_, call);
    int r = uffd_api(fd_, want, &features_, &ioctls_);
    if (r) {
      ::close(fd_);
      fd_ = -1;
      throw sys_error(env, r, "ioctl(UFFDIO_API)", "features 0x" + to_hex(want));
    }
    napi_add_env_cleanup_hook(env, &Uffd::Cleanup, this);
  }

  ~Uffd() override {
    if (fd_ >= 0) napi_remove_env_cleanup_hook(Env(), &Uffd::Cleanup, this);
    Shutdown();
  }

 private:
  static std::string to_hex(uint64_t v) {
    char b[32];
    snprintf(b, sizeof b, "%llx", (unsigned long long)v);
    return b;
  }
  static void Cleanup(void* arg) { static_cast<Uffd*>(arg)->Shutdown(); }

  static bool is_userfaultfd(int fd) {
    char link[64], target[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, target, sizeof target - 1);
    if (n <= 0) return false;
    target[n] = 0;
    return strstr(target, "userfaultfd") != nullptr;
  }

  void Shutdown() {
    if (reader_) {
      reader_->close();
      reader_ = nullptr;
    }
    if (fd_ >= 0) {
      registry_replace(fd_, held_fd_);  // a crashed agent's registrations stay, through the held descriptor
      ::close(fd_);
      fd_ = -1;
    }
  }

  void check_open(Napi::Env env) {
    if (fd_ < 0) {
      throw lib_error(env, "ERR_UFFD_CLOSED", "this userfaultfd is closed");
    }
  }

  struct Range {
    std::shared_ptr<Mapping> m;
    uint64_t off, len;
    uintptr_t start() const { return m->addr() + off; }
  };
  // (regionId, offset, length) at args i..i+2
  Range range_args(const Napi::CallbackInfo& info, size_t i) {
    check_open(info.Env());
    Range r{arg_region(info, i), arg_index(info, i + 1, "offset", 1ull << 46),
            arg_index(info, i + 2, "length", 1ull << 46)};
    check_range(info, *r.m, r.off, r.len);
    return r;
  }

  // register(regionId, offset, length, mode) -> ioctls the range supports
  Napi::Value Register(const Napi::CallbackInfo& info) {
    Range r = range_args(info, 0);
    uint64_t mode = arg_index(info, 3, "mode", 7);
    uint64_t ioctls = 0;
    int e = uffd_register(fd_, r.start(), r.len, mode, &ioctls);
    if (e) throw sys_error(info.Env(), e, "ioctl(UFFDIO_REGISTER)");
    if (mode == UFFDIO_REGISTER_MODE_MISSING) registry_set(r.m->id, fd_);  // a destination's (a sync-wp source's has WP too)
    return Napi::Number::New(info.Env(), (double)(ioctls & 0xffffffffu));
  }

  Napi::Value Unregister(const Napi::CallbackInfo& info) {
    Range r = range_args(info, 0);
    int e = uffd_unregister(fd_, r.start(), r.len);
    if (e) throw sys_error(info.Env(), e, "ioctl(UFFDIO_UNREGISTER)");
    if (r.off == 0 && r.len == r.m->size) registry_drop(r.m->id, fd_);
    return info.Env().Undefined();
  }

  // uffd_fill() of [start, start+len) (src == nullptr: zero pages); returns the number of pages that were
  // already there, throws for any other error.
  uint32_t fill(Napi::Env env, const char* call, uintptr_t start, const uint8_t* src, uint64_t len, bool wake) {
    UffdFill f;
    uint32_t existing = 0;
    f.src = src, f.wake = wake, f.ctx = &existing;
    f.on_existing = [](void* ctx, uintptr_t) { ++*(uint32_t*)ctx; };
    int e = uffd_fill(fd_, start, len, &f);
    if (e) throw sys_error(env, e, call);
    return existing;
  }

  // copy(regionId, offset, src: ArrayBufferView, wake = true) -> pages already present
  Napi::Value Copy(const Napi::CallbackInfo& info) {
    auto env = info.Env();
    check_open(env);
    auto m = arg_region(info, 0);
    uint64_t off = arg_index(info, 1, "offset", 1ull << 46);
    if (info.Length() < 3 || !info[2].IsTypedArray()) throw Napi::TypeError::New(env, "expected src to be a Uint8Array");
    auto src = info[2].As<Napi::TypedArray>();
    const uint8_t* data = (const uint8_t*)src.ArrayBuffer().Data() + src.ByteOffset();
    uint64_t len = src.ByteLength();
    check_range(info, *m, off, len);
    bool wake = arg_bool(info, 3, "wake", true);
    uint32_t existing = fill(env, "ioctl(UFFDIO_COPY)", m->addr() + off, data, len, wake);
    return Napi::Number::New(env, existing);
  }

  // zeropage(regionId, offset, length, wake = true) -> pages already present
  Napi::Value Zeropage(const Napi::CallbackInfo& info) {
    Range r = range_args(info, 0);
    bool wake = arg_bool(info, 3, "wake", true);
    uint32_t existing = fill(info.Env(), "ioctl(UFFDIO_ZEROPAGE)", r.start(), nullptr, r.len, wake);
    return Napi::Number::New(info.Env(), existing);
  }

  Napi::Value Wake(const Napi::CallbackInfo& info) {
    Range r = range_args(info, 0);
    int e = uffd_wake(fd_, r.start(), r.len);
    if (e) throw sys_error(info.Env(), e, "ioctl(UFFDIO_WAKE)");
    return info.Env().Undefined();
  }

  // writeProtect(regionId, offset, length, protect, wake = true)
  Napi::Value WriteProtect(const Napi::CallbackInfo& info) {
    Range r = range_args(info, 0);
    bool protect = arg_bool(info, 3, "protect", true), wake = arg_bool(info, 4, "wake", true);
    int e = uffd_writeprotect(fd_, r.start(), r.len, protect, wake);
    if (e) throw sys_error(info.Env(), e, "ioctl(UFFDIO_WRITEPROTECT)");
    return info.Env().Undefined();
  }

  Napi::Value StartFaults(const Napi::CallbackInfo& info) {
    auto env = info.Env();
    check_open(env);
    if (info.Length() < 1 || !info[0].IsFunction()) throw Napi::TypeError::New(env, "expected a callback");
    if (reader_) throw Napi::Error::New(env, "fault events are already being delivered");
    reader_ = new FaultReader(env, fd_, info[0].As<Napi::Function>());
    int r = reader_->start();
    if (r) {
      reader_->close();
      reader_ = nullptr;
      throw sys_error(env, r, "uv_poll_start");
    }
    return env.Undefined();
  }

  // Delivers the fault events queued right now to the startFaults callback,
  // synchronously; returns how many. For a thread busy with a long stretch of
  // work (installing pushed pages), which would see the uv_poll only after it.
  Napi::Value PollFaults(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), reader_ ? (double)reader_->drain() : 0);
  }

  Napi::Value StopFaults(const Napi::CallbackInfo& info) {
    if (reader_) {
      reader_->close();
      reader_ = nullptr;
    }
    return info.Env().Undefined();
  }

  Napi::Value Close(const Napi::CallbackInfo& info) {
    if (fd_ >= 0) napi_remove_env_cleanup_hook(info.Env(), &Uffd::Cleanup, this);
    Shutdown();
    registry_replace(held_fd_, -1);
    if (held_fd_ >= 0) ::close(held_fd_);
    held_fd_ = -1;
    return info.Env().Undefined();
  }

  // holdRegistrations() -> the held descriptor: from now on only close() ends the registrations. The environment's teardown (the agent's
  // worker terminated or crashed, the process exiting) closes this object's descriptor but not a second one kept
  // here, so the regions stay registered: a page that never arrived keeps faulting (its thread waits) instead of
  // reading as zero, which is what an unregistered missing page does. For a destination between its hand-off and
  // settling; one descriptor, kept for the life of the process when that ends without close().
  Napi::Value HoldRegistrations(const Napi::CallbackInfo& info) {
    check_open(info.Env());
    if (held_fd_ < 0) held_fd_ = fcntl(fd_, F_DUPFD_CLOEXEC, 0);
    if (held_fd_ < 0) throw sys_error(info.Env(), -errno, "fcntl(F_DUPFD_CLOEXEC)");
    return Napi::Number::New(info.Env(), held_fd_);
  }

  Napi::Value Features(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), (double)features_); }
  Napi::Value Ioctls(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), (double)(ioctls_ & 0xffffffffu)); }
  Napi::Value Fd(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), fd_); }

  int fd_ = -1;
  int held_fd_ = -1;  // holdRegistrations(): closed by close() only
  uint64_t features_ = 0, ioctls_ = 0;
  FaultReader* reader_ = nullptr;
};

// probe() -> { features, ioctls, error?, viaSyscall, viaDevice, pagemapScan }
Napi::Value Probe(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  auto out = Napi::Object::New(env);
  uint64_t features = 0, ioctls = 0;
  const char* call = "userfaultfd";
  int r = uffd_probe_features(&features, &ioctls, &call);
  out.Set("features", Napi::Number::New(env, (double)features));
  out.Set("ioctls", Napi::Number::New(env, (double)(ioctls & 0xffffffffu)));
  if (r) out.Set("error", sys_error(env, r, call).Value());
  // Each way of opening, on its own.
  int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC);
  out.Set("viaSyscall", fd >= 0 ? Napi::Value(Napi::Number::New(env, 0)) : Napi::String::New(env, errno_code(errno)));
  if (fd >= 0) ::close(fd);
  int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
  if (dev < 0) {
    out.Set("viaDevice", errno_code(errno));
  } else {
    int f = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC);
    out.Set("viaDevice", f >= 0 ? Napi::Value(Napi::Number::New(env, 0)) : Napi::String::New(env, errno_code(errno)));
    if (f >= 0) ::close(f);
    ::close(dev);
  }
  int p = pagemap_probe();
  out.Set("pagemapScan", p == 0 ? Napi::Value(Napi::Number::New(env, 0)) : Napi::String::New(env, errno_code(-p)));
  return out;
}

}  // namespace

void init_uffd_binding(Napi::Env env, Napi::Object exports) {
  exports.Set("Uffd", Uffd::Define(env));
  exports.Set("probe", Napi::Function::New(env, Probe));
  auto c = Napi::Object::New(env);
#define K(name) c.Set(#name, Napi::Number::New(env, (double)(name)))
  K(UFFD_FEATURE_PAGEFAULT_FLAG_WP); K(UFFD_FEATURE_EVENT_FORK); K(UFFD_FEATURE_EVENT_REMAP);
  K(UFFD_FEATURE_EVENT_REMOVE); K(UFFD_FEATURE_MISSING_HUGETLBFS); K(UFFD_FEATURE_MISSING_SHMEM);
  K(UFFD_FEATURE_EVENT_UNMAP); K(UFFD_FEATURE_SIGBUS); K(UFFD_FEATURE_THREAD_ID);
  K(UFFD_FEATURE_MINOR_HUGETLBFS); K(UFFD_FEATURE_MINOR_SHMEM); K(UFFD_FEATURE_EXACT_ADDRESS);
  K(UFFD_FEATURE_WP_HUGETLBFS_SHMEM); K(UFFD_FEATURE_WP_UNPOPULATED); K(UFFD_FEATURE_POISON);
  K(UFFD_FEATURE_WP_ASYNC); K(UFFD_FEATURE_MOVE);
  K(UFFDIO_REGISTER_MODE_MISSING); K(UFFDIO_REGISTER_MODE_WP); K(UFFDIO_REGISTER_MODE_MINOR);
  K(UFFD_PAGEFAULT_FLAG_WRITE); K(UFFD_PAGEFAULT_FLAG_WP); K(UFFD_PAGEFAULT_FLAG_MINOR);
  K(PM_SCAN_WP_MATCHING); K(PM_SCAN_CHECK_WPASYNC);
  K(PAGE_IS_WPALLOWED); K(PAGE_IS_WRITTEN); K(PAGE_IS_FILE); K(PAGE_IS_PRESENT); K(PAGE_IS_SWAPPED);
  K(PAGE_IS_PFNZERO); K(PAGE_IS_HUGE); K(PAGE_IS_SOFT_DIRTY);
  c.Set("_UFFDIO_ZEROPAGE", Napi::Number::New(env, _UFFDIO_ZEROPAGE));
  c.Set("_UFFDIO_WRITEPROTECT", Napi::Number::New(env, _UFFDIO_WRITEPROTECT));
  c.Set("_UFFDIO_CONTINUE", Napi::Number::New(env, _UFFDIO_CONTINUE));
#undef K
  exports.Set("constants", c);
}

}  // namespace uffdm
