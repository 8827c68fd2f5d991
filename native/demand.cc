// See demand.h: the thread base both ends of the demand connection share (demand_server.cc, demand_client.cc),
// its batches to JS, and the argument helpers of their JS classes.
#include "demand.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "demand_wire.h"
#include "errors.h"
#include "thread_util.h"

namespace uffdm {

bool write_all(int fd, int stop_fd, struct iovec* iov, int iovcnt, int* err) {
  while (iovcnt > 0) {
    ssize_t n = writev(fd, iov, iovcnt);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) {
        if (!wait_fd(fd, POLLOUT, stop_fd)) return *err = ECANCELED, false;
        continue;
      }
      return *err = errno, false;
    }
    while (iovcnt > 0 && (size_t)n >= iov->iov_len) n -= iov->iov_len, iov++, iovcnt--;
    if (iovcnt > 0) iov->iov_base = (uint8_t*)iov->iov_base + n, iov->iov_len -= n;
  }
  return true;
}

// ---- the thread and its batches ----------------------------------------------------

Napi::Float64Array events_array(Napi::Env env, const std::vector<DemandEvent>& events) {
  const size_t k = kDemandEventNumbers;
  auto arr = Napi::Float64Array::New(env, events.size() * k);
  for (size_t i = 0; i < events.size(); i++) {
    const auto& e = events[i];
    arr[i * k] = e.kind, arr[i * k + 1] = e.a, arr[i * k + 2] = e.b, arr[i * k + 3] = e.c, arr[i * k + 4] = e.d;
  }
  return arr;
}

std::vector<DemandEvent> Outbox::take(std::vector<std::vector<uint8_t>>* out_frames) {
  std::lock_guard<std::mutex> lock(mu);
  std::vector<DemandEvent> out;
  out.swap(batch);
  if (out_frames) out_frames->swap(frames);
  frames.clear();
  signalled = false;
  return out;
}

DemandThread::DemandThread(Napi::Env env, Napi::Function callback, const char* name, const char* thread_name)
    : thread_name_(thread_name), outbox_(std::make_shared<Outbox>()) {
  stop_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (stop_fd_ < 0) throw sys_error(env, -errno, "eventfd");
  tsfn_ = Napi::ThreadSafeFunction::New(env, callback, name, 0, 1);
  tsfn_.Unref(env);  // batches alone do not keep the agent's loop alive
}

DemandThread::~DemandThread() { stop(); }

void DemandThread::start() {
  thread_ = start_thread(
      [this] {
        // A blocked service thread waits on this one: it runs at the service's priority (the main thread's
        // nice), not at the agent's (agentNice, the bulk work), where the kernel allows it (CAP_SYS_NICE or
        // RLIMIT_NICE); otherwise it keeps the agent's. The priority first, then the name: a thread seen under
        // its name (top -H, /proc/<pid>/task/<tid>/comm) already has the priority it runs at.
        if (urgent_) run_at_service_nice();
        pthread_setname_np(pthread_self(), thread_name_);
      },
      [this] {
        run();
        timespec ts;
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
        emit({demand_wire::kEvCpu, ts.tv_sec * 1e3 + ts.tv_nsec / 1e6, 0, 0, 0});  // what this thread cost (the report's CPU figures)
      });
}

std::vector<DemandEvent> DemandThread::stop() {
  if (stop_fd_ < 0) return {};
  stopping_ = true;
  uint64_t one = 1;
  (void)!write(stop_fd_, &one, sizeof one);
  if (thread_.joinable()) thread_.join();
  close(stop_fd_);
  stop_fd_ = -1;
  tsfn_.Release();  // a call still queued finds the outbox empty
  return outbox_->take();
}

void DemandThread::emit(const DemandEvent& e) {
  std::lock_guard<std::mutex> lock(outbox_->mu);
  outbox_->batch.push_back(e);
}

bool DemandThread::place(int uffd, uintptr_t region_base, uint32_t region, uint32_t first, uint32_t count, const uint8_t* src) {
  const size_t ps = page_size();
  int e = install_pages(uffd, region_base + (size_t)first * ps, src, (size_t)count * ps, &stopping_);
  if (!e) return true;
  emit({(double)kEvInstallFailed, (double)-e, (double)region, (double)first, (double)count});
  flush(true);
  return false;
}

double DemandThread::cpu_ms() { return thread_cpu_ms(thread_); }

int DemandThread::flush_timeout_ms(int other) const {
  if (!deferred_) return other;
  double left_us = last_signal_us_ + flush_gap_us_ - now_us();
  int due = left_us <= 0 ? 0 : (int)((left_us + 999) / 1000);
  return other < 0 ? due : std::min(other, due);
}

void DemandThread::emit_frame(uint8_t type, std::vector<uint8_t> payload) {
  std::lock_guard<std::mutex> lock(outbox_->mu);
  outbox_->batch.push_back({(double)kEvFrame, (double)outbox_->frames.size(), (double)type, 0, 0});
  outbox_->urgent = true;
  outbox_->frames.push_back(std::move(payload));
}

void DemandThread::flush(bool urgent) {
  {
    std::lock_guard<std::mutex> lock(outbox_->mu);
    if (outbox_->batch.empty() || outbox_->signalled) return;
    double t = flush_gap_us_ > 0 ? now_us() : 0;
    if (!urgent && !outbox_->urgent && t - last_signal_us_ < flush_gap_us_) {
      deferred_ = true;
      return;
    }
    outbox_->signalled = true;
    outbox_->urgent = false;
    last_signal_us_ = t;
    deferred_ = false;
  }
  // The call takes the outbox when it runs, not now: events reach JS once and in order, and whatever is left
  // when the thread stops is handed over by stop() (synchronously, before the settled report is written).
  auto box = outbox_;
  tsfn_.NonBlockingCall([box](Napi::Env env, Napi::Function fn) {
    if (env == nullptr || fn.IsEmpty()) return;
    std::vector<std::vector<uint8_t>> frames;
    auto events = box->take(&frames);
    if (events.empty()) return;
    // plain C API from here: see new_float64_array()
    napi_handle_scope scope;
    if (napi_open_handle_scope(env, &scope) != napi_ok) return;
    const size_t k = kDemandEventNumbers;
    napi_value arr = new_float64_array(env, events.size() * k, [&](double* d) {
      for (size_t i = 0; i < events.size(); i++) {
        const auto& e = events[i];
        d[i * k] = e.kind, d[i * k + 1] = e.a, d[i * k + 2] = e.b, d[i * k + 3] = e.c, d[i * k + 4] = e.d;
      }
    });
    napi_value js_frames = nullptr;
    bool ok = arr && napi_create_array_with_length(env, frames.size(), &js_frames) == napi_ok;
    for (size_t i = 0; ok && i < frames.size(); i++) {
      napi_value buf;
      void* data = nullptr;
      ok = napi_create_buffer_copy(env, frames[i].size(), frames[i].data(), &data, &buf) == napi_ok &&
           napi_set_element(env, js_frames, (uint32_t)i, buf) == napi_ok;
    }
    if (ok) call_js(env, fn, {arr, js_frames});
    napi_close_handle_scope(env, scope);
  });
}

napi_value new_float64_array(napi_env env, size_t n, const std::function<void(double*)>& fill) {
  void* data = nullptr;
  napi_value ab, arr;
  if (napi_create_arraybuffer(env, n * sizeof(double), &data, &ab) != napi_ok) return nullptr;
  if (napi_create_typedarray(env, napi_float64_array, n, ab, 0, &arr) != napi_ok) return nullptr;
  fill(static_cast<double*>(data));
  return arr;
}

void call_js(napi_env env, napi_value fn, std::initializer_list<napi_value> args) {
  napi_value recv, result;
  if (napi_get_undefined(env, &recv) != napi_ok) return;
  std::vector<napi_value> argv(args);
  if (napi_call_function(env, recv, fn, argv.size(), argv.data(), &result) == napi_ok) return;
  bool pending = false;
  napi_value exc;
  if (napi_is_exception_pending(env, &pending) != napi_ok || !pending) return;
  if (napi_get_and_clear_last_exception(env, &exc) != napi_ok) return;
  napi_valuetype t;
  // a terminating environment has no real exception to report (undefined): nothing to do
  if (napi_typeof(env, exc, &t) == napi_ok && t != napi_undefined) napi_fatal_exception(env, exc);
}

std::vector<RegionView> region_views(const Napi::CallbackInfo& info, size_t i, std::vector<Napi::ObjectReference>* keep) {
  auto env = info.Env();
  if (info.Length() < i + 2 || !info[i].IsArray() || !info[i + 1].IsArray())
    throw Napi::TypeError::New(env, "expected regionIds and bitmaps arrays");
  auto ids = info[i].As<Napi::Array>(), maps = info[i + 1].As<Napi::Array>();
  if (ids.Length() != maps.Length()) throw Napi::TypeError::New(env, "expected one bitmap per region");
  std::vector<RegionView> out;
  const size_t ps = page_size();
  for (uint32_t k = 0; k < ids.Length(); k++) {
    Napi::Value id = ids[k];
    if (!id.IsNumber()) throw Napi::TypeError::New(env, "expected region ids to be numbers");
    auto m = region_find(id.As<Napi::Number>().Uint32Value());
    if (!m) throw lib_error(env, "ERR_REGION_RELEASED", "a region of the demand path does not exist or was released");
    RegionView v;
    v.m = m;
    v.pages = (uint32_t)(m->size / ps);
    out.push_back(std::move(v));
  }
  auto words = bitmap_words(info, i + 1, out, keep);
  for (size_t k = 0; k < out.size(); k++) out[k].bits = words[k];
  return out;
}

std::vector<uint32_t*> bitmap_words(const Napi::CallbackInfo& info, size_t i, const std::vector<RegionView>& regions, std::vector<Napi::ObjectReference>* keep) {
  auto env = info.Env();
  if (info.Length() <= i || !info[i].IsArray()) throw Napi::TypeError::New(env, "expected an array of bitmaps");
  auto maps = info[i].As<Napi::Array>();
  if (maps.Length() != regions.size()) throw Napi::TypeError::New(env, "expected one bitmap per region");
  std::vector<uint32_t*> out;
  for (uint32_t k = 0; k < maps.Length(); k++) {
    Napi::Value map = maps[k];
    if (!map.IsTypedArray() || map.As<Napi::TypedArray>().TypedArrayType() != napi_uint32_array)
      throw Napi::TypeError::New(env, "expected bitmaps to be Uint32Arrays");
    auto words = map.As<Napi::Uint32Array>();
    if (words.ElementLength() < (regions[k].pages + 31) / 32) throw Napi::RangeError::New(env, "expected a bitmap word per 32 pages");
    out.push_back(words.Data());
    keep->push_back(Napi::Persistent(words.As<Napi::Object>()));
  }
  return out;
}

int dup_socket(Napi::Env env, const Napi::Value& v) {
  if (!v.IsNumber()) throw Napi::TypeError::New(env, "expected fd to be a number");
  int fd = fcntl(v.As<Napi::Number>().Int32Value(), F_DUPFD_CLOEXEC, 3);
  if (fd < 0) throw sys_error(env, -errno, "fcntl(F_DUPFD_CLOEXEC)");
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  return fd;
}

std::vector<uint8_t> bytes_arg(const Napi::CallbackInfo& info, size_t i) {
  if (info.Length() <= i || !info[i].IsTypedArray()) return {};
  auto h = info[i].As<Napi::Uint8Array>();
  return std::vector<uint8_t>(h.Data(), h.Data() + h.ByteLength());
}

void init_demand_bindings(Napi::Env env, Napi::Object exports) {
  exports.Set("DemandServer", demand_wire::define_demand_server(env));
  exports.Set("DemandClient", demand_wire::define_demand_client(env));
}

}  // namespace uffdm
