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
#include <functional>
#include <initializer_list>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "page_maps.h"
#include "region.h"

namespace uffdm {

// One event for JS: five numbers (kind, a, b, c, d); the kinds are in demand_wire.h.
struct DemandEvent {
  double kind, a, b, c, d;
};
constexpr int kDemandEventNumbers = 5;

// Events (and whole frames for JS, referenced by a FRAME event) not yet taken by JS; shared with the calls
// queued on the ThreadSafeFunction.
struct Outbox {
  std::mutex mu;
  std::vector<DemandEvent> batch;
  std::vector<std::vector<uint8_t>> frames;
  bool signalled = false;  // a call is queued that will take the batch
  bool urgent = false;     // the batch holds a frame for JS: handed over now, whatever the gap
  std::vector<DemandEvent> take(std::vector<std::vector<uint8_t>>* frames = nullptr);
};
constexpr int kEvFrame = 9;  // (index in the batch's frames, frame type): a frame for JS, in order with the events

// The thread, the stop eventfd and the batch of events both sides share.
class DemandThread {
 public:
  // name: the async resource's; thread_name: the OS thread's (at most 15 characters)
  DemandThread(Napi::Env env, Napi::Function callback, const char* name, const char* thread_name);
  virtual ~DemandThread();
  // Stops and joins the thread (idempotent); returns the events JS has not taken yet.
  std::vector<DemandEvent> stop();
  void emit(const DemandEvent& e);
  // install_pages() of [first, first+count) of a region mapped at region_base (src == nullptr: zero pages). false when
  // they could not be placed: JS is told at once (it fails the migration) and the caller leaves them unmarked.
  bool place(int uffd, uintptr_t region_base, uint32_t region, uint32_t first, uint32_t count, const uint8_t* src);
  // A frame the thread does not handle itself: JS routes it, in order with the events before and after it.
  void emit_frame(uint8_t type, std::vector<uint8_t> payload);
  // Hands the batch to JS (at most one call in flight): onEvents(events, frames). With a flush gap, JS is woken
  // at most once per gap unless `urgent` (or a frame waits): the rest waits for flush_timeout_ms().
  void flush(bool urgent = false);
  // CPU time of the thread so far (user + system), ms.
  double cpu_ms();

 protected:
  void start();
  virtual void run() = 0;
  // Timeout for the thread's poll: `other` ms, or less when a deferred batch is due sooner (-1: none).
  int flush_timeout_ms(int other) const;
  // Threads that emit on every fault or frame (the destination's readers) wake JS at most once per this many
  // microseconds: woken per event, the agent's loop took a quarter of a vCPU in post-copy under 100k writes/s,
  // CPU the push and the faults need. 0: every flush wakes JS (the writer's DONE paces its pipeline).
  double flush_gap_us_ = 0;
  static constexpr double kFlushGapUs = 1000;
  int stop_fd_ = -1;
  std::atomic<bool> stopping_{false};
  const char* thread_name_;
  // A blocked service thread waits on this thread (the demand path): it runs at the service's nice. Bulk work
  // (false) keeps the agent's (agentNice).
  bool urgent_ = true;

 private:
  Napi::ThreadSafeFunction tsfn_;
  std::thread thread_;
  std::shared_ptr<Outbox> outbox_;
  double last_signal_us_ = 0;
  bool deferred_ = false;  // a batch waits for the gap to end
};


// (regionIds: number[], bitmaps: Uint32Array[]) at args i, i+1 -> views; the bitmaps are kept alive in *keep.
std::vector<RegionView> region_views(const Napi::CallbackInfo& info, size_t i, std::vector<Napi::ObjectReference>* keep);
// Word arrays of more page bitmaps (one per region, in the same order), kept alive in *keep.
std::vector<uint32_t*> bitmap_words(const Napi::CallbackInfo& info, size_t i, const std::vector<RegionView>& regions, std::vector<Napi::ObjectReference>* keep);
// A dup() of a connected socket's descriptor, non-blocking.
int dup_socket(Napi::Env env, const Napi::Value& v);
// Bytes of a Uint8Array argument (empty when absent).
std::vector<uint8_t> bytes_arg(const Napi::CallbackInfo& info, size_t i);
Napi::Float64Array events_array(Napi::Env env, const std::vector<DemandEvent>& events);
// A Float64Array of `n` numbers filled by fill(data), with the plain C API: nullptr when the environment cannot make
// one (a worker being terminated). The node-addon-api wrappers would throw there, and creating that error fails too:
// a fatal error of the whole process (seen in CI when a test ended its guest while a batch was queued).
napi_value new_float64_array(napi_env env, size_t n, const std::function<void(double*)>& fill);
// Calls fn(args) from a ThreadSafeFunction callback: a JS exception goes to the thread's 'uncaughtException'; a call
// refused because the environment is being torn down is dropped.
void call_js(napi_env env, napi_value fn, std::initializer_list<napi_value> args);

// The JS side of a thread: stopped and joined by close(), by the environment's cleanup hook and when collected.
template <typename T>
class ThreadWrap : public Napi::ObjectWrap<T> {
 public:
  explicit ThreadWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<T>(info), env_(info.Env()) {
    hooked_ = napi_add_env_cleanup_hook(env_, &ThreadWrap::Cleanup, this) == napi_ok;
  }
  // Also when the subclass's constructor threw (bad arguments): the hook must not outlive this object (a later
  // object at the same address could not register its own, and the environment's teardown would call freed memory).
  ~ThreadWrap() override {
    Shutdown();
    Unhook();
  }

 protected:
  static void Cleanup(void* arg) {
    auto* self = static_cast<ThreadWrap*>(arg);
    self->hooked_ = false;  // the environment is running its hooks: this one is gone
    self->Shutdown();
  }
  void Unhook() {
    if (hooked_) napi_remove_env_cleanup_hook(env_, &ThreadWrap::Cleanup, this);
    hooked_ = false;
  }
  // Stops and joins the thread; returns the events JS has not taken yet.
  std::vector<DemandEvent> Shutdown() {
    if (!thread_) return {};
    Unhook();
    auto left = thread_->stop();
    thread_.reset();
    keep_.clear();
    return left;
  }
  // close() -> the events the thread emitted that JS has not seen yet (handled synchronously by the caller)
  Napi::Value Close(const Napi::CallbackInfo& info) { return events_array(info.Env(), Shutdown()); }
  // cpuMs: the thread's CPU time so far, ms (0 once closed: its last batch carried the total)
  Napi::Value CpuMs(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), thread_ ? thread_->cpu_ms() : 0); }
  std::unique_ptr<DemandThread> thread_;
  std::vector<Napi::ObjectReference> keep_;

 private:
  napi_env env_;
  bool hooked_ = false;
};

// Whole-run writes on a non-blocking socket: waits for POLLOUT and for the
// stop eventfd; false when stopping or the socket failed (*err = errno).
bool write_all(int fd, int stop_fd, struct iovec* iov, int iovcnt, int* err);

}  // namespace uffdm
