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
// Linux PRIO_PROCESS with a thread id applies to that thread). Returns the
// value the thread had before.
Napi::Value SetThreadNice(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  int nice = (int)arg_index(info, 0, "nice", 19);
  pid_t tid = (pid_t)syscall(SYS_gettid);
  errno = 0;
  int before = getpriority(PRIO_PROCESS, (id_t)tid);
  if (before == -1 && errno) throw sys_error(env, -errno, "getpriority");
  if (setpriority(PRIO_PROCESS, (id_t)tid, nice)) throw sys_error(env, -errno, "setpriority");
  return Napi::Number::New(env, before);
}

// threadNice(): nice value of the calling thread.
Napi::Value ThreadNice(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  errno = 0;
  int now = getpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid));
  if (now == -1 && errno) throw sys_error(env, -errno, "getpriority");
  return Napi::Number::New(env, now);
}

}  // namespace

void init_thread_bindings(Napi::Env env, Napi::Object exports) {
  exports.Set("setThreadNice", Napi::Function::New(env, SetThreadNice));
  exports.Set("threadNice", Napi::Function::New(env, ThreadNice));
}

}  // namespace uffdm
