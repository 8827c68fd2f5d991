// Small pieces every native thread shares: its priority and its CPU time.
#pragma once
#include <errno.h>
#include <pthread.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <thread>

namespace uffdm {

// The calling thread takes the process's nice value (the main thread's, the service's): a service thread blocked in
// a fault waits on it, so it must not run at the agent's (agentNice). Where the kernel refuses (no CAP_SYS_NICE or
// RLIMIT_NICE) it keeps the one it inherited.
inline void run_at_service_nice() {
  errno = 0;
  int nice = getpriority(PRIO_PROCESS, (id_t)getpid());
  if (errno == 0) (void)setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), nice);
}

// CPU time (user + system) of a running thread so far, ms; 0 once it ended.
inline double thread_cpu_ms(std::thread& t) {
  clockid_t id;
  timespec ts{};
  if (!t.joinable() || pthread_getcpuclockid(t.native_handle(), &id) || clock_gettime(id, &ts)) return 0;
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

}  // namespace uffdm
