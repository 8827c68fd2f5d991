#include "fault_reader.h"

#include <errno.h>
#include <linux/userfaultfd.h>
#include <unistd.h>

#include "errors.h"
#include "region.h"

namespace uffdm {

FaultReader::FaultReader(Napi::Env env, int fd, Napi::Function callback)
    : env_(env), fd_(fd), callback_(Napi::Persistent(callback)),
      context_(std::make_unique<Napi::AsyncContext>(env, "uffd-migrate:faults")) {
  poll_.data = this;
}

int FaultReader::start() {
  uv_loop_t* loop = nullptr;
  napi_get_uv_event_loop(env_, &loop);
  int r = uv_poll_init(loop, &poll_, fd_);
  if (r) return r;
  // Faults alone do not keep the agent's loop alive: its sockets do.
  uv_unref((uv_handle_t*)&poll_);
  return uv_poll_start(&poll_, UV_READABLE, on_readable);
}

void FaultReader::close() {
  callback_.Reset();
  context_.reset();
  uv_poll_stop(&poll_);
  uv_close((uv_handle_t*)&poll_, [](uv_handle_t* h) { delete static_cast<FaultReader*>(h->data); });
}

void FaultReader::on_readable(uv_poll_t* handle, int status, int) {
  auto* self = static_cast<FaultReader*>(handle->data);
  if (status < 0 || self->callback_.IsEmpty()) return;
  self->drain();
}

size_t FaultReader::drain() {
  constexpr int kBatch = 128;
  size_t delivered = 0;
  if (callback_.IsEmpty()) return 0;
  uffd_msg msgs[kBatch];
  const size_t ps = page_size();
  Napi::HandleScope scope(env_);
  for (;;) {
    ssize_t n = read(fd_, msgs, sizeof(msgs));
    if (n <= 0) break;  // EAGAIN: drained
    size_t count = (size_t)n / sizeof(uffd_msg);
    auto events = Napi::Uint32Array::New(env_, count * 3);
    size_t k = 0;
    std::shared_ptr<Mapping> m;
    for (size_t i = 0; i < count; i++) {
      if (msgs[i].event != UFFD_EVENT_PAGEFAULT) continue;
      uintptr_t addr = (uintptr_t)msgs[i].arg.pagefault.address;
      if (!m || addr < m->addr() || addr >= m->addr() + m->size) m = region_find_addr(addr);
      if (!m) continue;  // region already released
      events[k++] = m->id;
      events[k++] = (uint32_t)((addr - m->addr()) / ps);
      events[k++] = (uint32_t)msgs[i].arg.pagefault.flags;
    }
    if (k == 0) continue;
    delivered += k / 3;
    Napi::Uint32Array batch = k == count * 3 ? events : Napi::Uint32Array::New(env_, k, events.ArrayBuffer(), 0);
    try {
      callback_.MakeCallback(env_.Global(), {batch}, *context_);
    } catch (const Napi::Error& e) {
      // An exception in the handler goes to the thread's 'uncaughtException'.
      napi_fatal_exception(env_, e.Value());
      break;
    }
    if (count < (size_t)kBatch) break;
  }
  return delivered;
}

}  // namespace uffdm
