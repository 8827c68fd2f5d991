// The demand path of post-copy, on native threads (QEMU's postcopy-preempt
// channel, made a thread of its own on both sides): a fault on the
// destination becomes a PAGE_REQUEST on a connection of its own, the source
// answers from region memory with writev, and the destination installs the
// reply with UFFDIO_COPY straight from the buffer the socket read into. No
// byte and no fault passes through JavaScript, which is busy with the push;
// JS learns what happened in batches (policy pivots, counts, latencies).
//
// Threads follow CONVENTIONS.md: an eventfd asks them to stop, they are
// joined on close and by the environment's cleanup hook, and results go to
// JS in batches through one ThreadSafeFunction call at a time.
#pragma once
#include <napi.h>
#include <sys/uio.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "region.h"

namespace uffdm {

// One event for JS: five numbers (kind, a, b, c, d); the kinds are in demand.cc.
struct DemandEvent {
  double kind, a, b, c, d;
};
constexpr int kDemandEventNumbers = 5;

// Events not yet taken by JS; shared with the calls queued on the ThreadSafeFunction.
struct Outbox {
  std::mutex mu;
  std::vector<DemandEvent> batch;
  bool signalled = false;  // a call is queued that will take the batch
  std::vector<DemandEvent> take();
};

// The thread, the stop eventfd and the batch of events both sides share.
class DemandThread {
 public:
  // name: the async resource's; thread_name: the OS thread's (at most 15 characters)
  DemandThread(Napi::Env env, Napi::Function callback, const char* name, const char* thread_name);
  virtual ~DemandThread();
  // Stops and joins the thread (idempotent); returns the events JS has not taken yet.
  std::vector<DemandEvent> stop();
  void emit(const DemandEvent& e);
  void flush();  // hands the batch to JS (at most one call in flight)

 protected:
  void start();
  virtual void run() = 0;
  int stop_fd_ = -1;
  std::atomic<bool> stopping_{false};
  const char* thread_name_;

 private:
  Napi::ThreadSafeFunction tsfn_;
  std::thread thread_;
  std::shared_ptr<Outbox> outbox_;
};

// Whole-run writes on a non-blocking socket: waits for POLLOUT and for the
// stop eventfd; false when stopping or the socket failed (*err = errno).
bool write_all(int fd, int stop_fd, struct iovec* iov, int iovcnt, int* err);

}  // namespace uffdm
