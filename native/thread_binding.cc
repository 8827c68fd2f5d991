// Scheduling priority of the calling thread. The agent's worker does
// background work (pushing and installing pages) on the same CPUs as the
// service; a positive nice value lets the service's own threads win the CPU
// when both want it, while the agent still gets every idle cycle.
#include <errno.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "args.h"
#include "bindings.h"
#include "errors.h"

namespace uffdm {

namespace {

// setThreadNice(nice): nice value (0..19) of the calling thread only (on
// Linux PRIO_PROCESS with a thread id applies to that thread).
Napi::Value SetThreadNice(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  int nice = (int)arg_index(info, 0, "nice", 19);
  if (setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), nice)) throw sys_error(env, -errno, "setpriority");
  return env.Undefined();
}

}  // namespace

void init_thread_bindings(Napi::Env env, Napi::Object exports) {
  exports.Set("setThreadNice", Napi::Function::New(env, SetThreadNice));
}

}  // namespace uffdm
