// Delivers userfaultfd fault events to JS in batches, from a uv_poll in the
// event loop of the thread that owns the uffd (the agent's worker): one
// cross-CPU wake per fault. A native reader thread + ThreadSafeFunction would
// add a second one (reader thread -> worker loop via uv_async); on this VM the
// C reference puts one such wake at ~27 us (fault_rtt ...p50.deliver), and
// bench/native.mjs measures the whole uv_poll round trip at ~1.2x the C
// handler's, so the second wake would cost more than all of our overhead.
#pragma once
#include <napi.h>
#include <uv.h>

#include <memory>

namespace uffdm {

class FaultReader {
 public:
  // callback(events: Uint32Array) with triples [regionId, pageIndex, flags].
  FaultReader(Napi::Env env, int fd, Napi::Function callback);
  int start();
  // Stops polling and frees itself once libuv has closed the handle.
  void close();
  // Reads every queued event and hands them to the callback; returns how many.
  size_t drain();

 private:
  ~FaultReader() = default;
  static void on_readable(uv_poll_t* handle, int status, int events);

  Napi::Env env_;
  int fd_;
  uv_poll_t poll_;
  Napi::FunctionReference callback_;
  // Released in close(), not in the uv_close callback: that may run after
  // the environment is gone (worker termination).
  std::unique_ptr<Napi::AsyncContext> context_;
};

}  // namespace uffdm
