#include "errors.h"

#include <errno.h>
#include <string.h>

namespace uffdm {

namespace {
struct ErrorData {
  Napi::FunctionReference error_class;
};
}  // namespace

void errors_init(Napi::Env env, Napi::Function error_class) {
  auto* data = new ErrorData();
  data->error_class = Napi::Persistent(error_class);
  env.SetInstanceData<ErrorData>(data);
}

const char* errno_code(int err) {
  const char* name = strerrorname_np(err);
  return name ? name : "EUNKNOWN";
}

static std::string hint(int err, const std::string& call) {
  bool uffd_open = call == "userfaultfd" || call.rfind("ioctl(USERFAULTFD_IOC_NEW", 0) == 0;
  if (uffd_open && (err == EPERM || err == EACCES))
    return "userfaultfd is not permitted for this process: run as root, grant CAP_SYS_PTRACE, set "
           "sysctl vm.unprivileged_userfaultfd=1, or give this user read/write access to /dev/userfaultfd";
  if (uffd_open && err == ENOSYS) return "this kernel was built without CONFIG_USERFAULTFD";
  if (call == "ioctl(UFFDIO_API)" && err == EINVAL)
    return "the kernel does not offer a requested userfaultfd feature; run `npx uffd-migrate doctor`";
  if (call == "ioctl(PAGEMAP_SCAN)" && (err == EINVAL || err == ENOTTY))
    return "PAGEMAP_SCAN needs Linux 6.7 or newer; run `npx uffd-migrate doctor`";
  if (call == "ioctl(UFFDIO_REGISTER)" && err == EBUSY)
    return "the range is already registered with another userfaultfd";
  if (call == "ioctl(UFFDIO_REGISTER)" && err == EINVAL)
    return "the kernel refused this registration mode for the range (missing feature?); run `npx uffd-migrate doctor`";
  if (call == "mmap" && err == ENOMEM) return "not enough address space for the region; check ulimit -v and vm.max_map_count";
  if (err == ENOENT || err == ESRCH) return "the target address space is gone";
  return strerror(err);
}

static Napi::Object make_error(Napi::Env env, const std::string& msg) {
  auto* data = env.GetInstanceData<ErrorData>();
  if (data && !data->error_class.IsEmpty()) return data->error_class.New({Napi::String::New(env, msg)});
  return Napi::Error::New(env, msg).Value();
}

Napi::Error lib_error(Napi::Env env, const char* code, const std::string& message) {
  Napi::Object obj = make_error(env, message);
  obj.Set("code", code);
  return Napi::Error(env, obj);
}

Napi::Error sys_error(Napi::Env env, int neg_errno, const char* syscall, const std::string& context) {
  int err = neg_errno < 0 ? -neg_errno : neg_errno;
  std::string msg = std::string(syscall) + " failed with " + errno_code(err) + ": " + hint(err, syscall);
  if (!context.empty()) msg += " (" + context + ")";
  Napi::Object obj = make_error(env, msg);
  obj.Set("code", errno_code(err));
  obj.Set("errno", Napi::Number::New(env, err));
  obj.Set("syscall", Napi::String::New(env, syscall));
  return Napi::Error(env, obj);
}

}  // namespace uffdm
