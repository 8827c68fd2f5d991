// Small pieces every native thread shares: its priority and its CPU time.
#pragma once
#include <errno.h>
#include <pthread.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <future>
#include <thread>
#include <utility>

namespace uffdm {

// The calling thread takes the process's nice value (the main thread's, the service's): a service thread blocked in
// a fault waits on it, so it must not run at the agent's (agentNice). Where the kernel refuses (no CAP_SYS_NICE or
// RLIMIT_NICE) it keeps the one it inherited.
inline void run_at_service_nice() {
  errno = 0;
  int nice = getpriority(PRIO_PROCESS, (id_t)getpid());
  if (errno == 0) (void)setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), nice);
}

// A thread that runs setup() (its priority, then its name), then body(); returns once setup() ran. A thread the
// agent started is what it will be by the time its constructor returns: what /proc and `top -H` show of it (and
// what tests read) is never the priority or name it inherited.
template <class Setup, class Body>
std::thread start_thread(Setup setup, Body body) {
  std::promise<void> ready;
  std::future<void> started = ready.get_future();
  std::thread t([setup = std::move(setup), body = std::move(body), ready = std::move(ready)]() mutable {
    setup();
    ready.set_value();
    body();
  });
  started.wait();
  return t;
}

// CPU time (user + system) of a running thread so far, ms; 0 once it ended.
inline double thread_cpu_ms(std::thread& t) {
  clockid_t id;
  timespec ts{};
  if (!t.joinable() || pthread_getcpuclockid(t.native_handle(), &id) || clock_gettime(id, &ts)) return 0;
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

}  // namespace uffdm
