// Scheduling priority of the calling thread. The agent's worker does
// background work (pushing and installing pages) on the same CPUs as the
// service; a positive nice value lets the service's own threads win the CPU
// when both want it, while the agent still gets every idle cycle.
#include <errno.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
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

// threadCpuMs(): CPU time (user + system) of the calling thread, in ms. Node 20 has no per-thread figure;
// the agent reports its own cost per GiB moved (bench:migrate sets it beside the C reference's).
Napi::Value ThreadCpuMs(const Napi::CallbackInfo& info) {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return Napi::Number::New(info.Env(), ts.tv_sec * 1e3 + ts.tv_nsec / 1e6);
}

// exitProcess(code): ends the process at once with this exit code, from any thread, running no JavaScript. For a
// destination whose migration failed after the hand-off: a service thread blocked in a fault on a page that cannot
// arrive any more never runs again, so neither a handler nor process.exit() on it can end the process.
Napi::Value ExitProcess(const Napi::CallbackInfo& info) {
  int code = (int)arg_index(info, 0, "code", 255);
  _exit(code);
}

}  // namespace

void init_thread_bindings(Napi::Env env, Napi::Object exports) {
  exports.Set("setThreadNice", Napi::Function::New(env, SetThreadNice));
  exports.Set("threadCpuMs", Napi::Function::New(env, ThreadCpuMs));
  exports.Set("exitProcess", Napi::Function::New(env, ExitProcess));
}

}  // namespace uffdm
