// Delivers userfaultfd fault events to JS in batches, from a uv_poll in the
// event loop of the thread that owns the uffd (the agent's worker). One wake
// per batch: measured faster than a native reader thread + ThreadSafeFunction,
// which adds a second cross-thread wake (see bench/native.mjs).
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

 private:
  ~FaultReader() = default;
  static void on_readable(uv_poll_t* handle, int status, int events);
  void drain();

  Napi::Env env_;
  int fd_;
  uv_poll_t poll_;
  Napi::FunctionReference callback_;
  // Released in close(), not in the uv_close callback: that may run after
  // the environment is gone (worker termination).
  std::unique_ptr<Napi::AsyncContext> context_;
};

}  // namespace uffdm
