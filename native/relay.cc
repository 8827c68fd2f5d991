// The forwarder's byte relay: after the hand-off the source relays every
// client connection of the moved service to the destination's service. In
// JS that cost 240-360 s of CPU per GiB (bench:migrate, 'fwd CPU'): a read,
// a Buffer, a write and an event-loop turn per message. Here one epoll thread
// moves the bytes of every pair with splice(2) through a pipe per direction:
// no copy to user space and no JS per message. JS hands a pair over once
// (both sockets connected, nothing buffered in Node) and hears when it ended.
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include "bindings.h"
#include "demand.h"
#include "errors.h"

namespace uffdm {

namespace {

constexpr size_t kSpliceBytes = 1 << 16;

// One direction of a pair: bytes from `from` go through the pipe to `to`.
struct Flow {
  int from = -1, to = -1;
  int pipe_r = -1, pipe_w = -1;
  size_t in_pipe = 0;
  bool eof = false, done = false;
  double bytes = 0;
};

struct Pair {
  uint32_t id;
  int a = -1, b = -1;  // dup()s of the client's and the upstream's sockets
  Flow flows[2];       // a -> b, b -> a
  bool failed = false;
};

struct Ended {
  uint32_t id;
  double a_to_b, b_to_a;
};

class RelayThread {
 public:
  RelayThread(Napi::Env env, Napi::Function cb) {
    ep_ = epoll_create1(EPOLL_CLOEXEC);
    stop_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (ep_ < 0 || stop_fd_ < 0) throw sys_error(env, -errno, "epoll_create1/eventfd");
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = UINT64_MAX;
    epoll_ctl(ep_, EPOLL_CTL_ADD, stop_fd_, &ev);
    tsfn_ = Napi::ThreadSafeFunction::New(env, cb, "uffd-migrate:relay", 0, 1);
    tsfn_.Unref(env);
    thread_ = std::thread([this] {
      pthread_setname_np(pthread_self(), "uffdm-relay");
      run();
    });
    cpu_clock_ok_ = pthread_getcpuclockid(thread_.native_handle(), &cpu_clock_) == 0;
  }
  ~RelayThread() { stop(); }

  // Takes dup()s of both sockets; the pair starts moving bytes at once. Returns the pair's id.
  uint32_t add(Napi::Env env, int client, int upstream) {
    auto p = std::make_unique<Pair>();
    p->a = fcntl(client, F_DUPFD_CLOEXEC, 3);
    p->b = fcntl(upstream, F_DUPFD_CLOEXEC, 3);
    int pipes[2][2];
    bool ok = p->a >= 0 && p->b >= 0 && pipe2(pipes[0], O_CLOEXEC | O_NONBLOCK) == 0;
    if (ok && pipe2(pipes[1], O_CLOEXEC | O_NONBLOCK)) {
      close(pipes[0][0]), close(pipes[0][1]);
      ok = false;
    }
    if (!ok) {
      int e = errno;
      if (p->a >= 0) close(p->a);
      if (p->b >= 0) close(p->b);
      throw sys_error(env, -e, "relay: dup/pipe2");
    }
    for (int fd : {p->a, p->b}) fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    p->flows[0] = {p->a, p->b, pipes[0][0], pipes[0][1]};
    p->flows[1] = {p->b, p->a, pipes[1][0], pipes[1][1]};
    std::lock_guard<std::mutex> lock(mu_);
    p->id = ++next_id_;
    uint32_t id = p->id;
    for (int side = 0; side < 2; side++) {
      epoll_event ev{};
      ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
      ev.data.u64 = (uint64_t)id << 1 | side;
      epoll_ctl(ep_, EPOLL_CTL_ADD, side ? p->b : p->a, &ev);
    }
    pairs_.emplace(id, std::move(p));
    return id;
  }

  double cpu_ms() const {
    timespec ts{};
    if (!cpu_clock_ok_ || clock_gettime(cpu_clock_, &ts)) return 0;
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
  }

  size_t active() {
    std::lock_guard<std::mutex> lock(mu_);
    return pairs_.size();
  }

  void stop() {
    if (stop_fd_ < 0) return;
    uint64_t one = 1;
    (void)!write(stop_fd_, &one, sizeof one);
    if (thread_.joinable()) thread_.join();
    for (auto& [id, p] : pairs_) release(*p);
    pairs_.clear();
    close(stop_fd_), close(ep_);
    stop_fd_ = ep_ = -1;
    tsfn_.Release();
  }

 private:
  void run() {
    epoll_event evs[64];
    for (;;) {
      int n = epoll_wait(ep_, evs, 64, -1);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return;
      std::vector<Ended> ended;
      {
        std::lock_guard<std::mutex> lock(mu_);
        for (int i = 0; i < n; i++) {
          if (evs[i].data.u64 == UINT64_MAX) return;
          auto it = pairs_.find((uint32_t)(evs[i].data.u64 >> 1));
          if (it == pairs_.end()) continue;
          Pair& p = *it->second;
          pump(p.flows[0], p);
          pump(p.flows[1], p);
          if (p.failed || (p.flows[0].done && p.flows[1].done)) {
            ended.push_back({p.id, p.flows[0].bytes, p.flows[1].bytes});
            release(p);
            pairs_.erase(it);
          }
        }
      }
      if (!ended.empty()) deliver(std::move(ended));
    }
  }

  // Moves what it can of one direction, until the source or the destination would block.
  static void pump(Flow& f, Pair& p) {
    while (!f.done && !p.failed) {
      if (!f.eof && f.in_pipe < kSpliceBytes) {
        ssize_t n = splice(f.from, nullptr, f.pipe_w, nullptr, kSpliceBytes - f.in_pipe, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (n > 0) f.in_pipe += (size_t)n;
        else if (n == 0) f.eof = true;
        else if (errno != EAGAIN && errno != EINTR) p.failed = true;
      }
      if (f.in_pipe > 0) {
        ssize_t m = splice(f.pipe_r, nullptr, f.to, nullptr, f.in_pipe, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (m > 0) {
          f.in_pipe -= (size_t)m;
          f.bytes += (double)m;
          continue;
        }
        if (m < 0 && errno != EAGAIN && errno != EINTR) p.failed = true;
        return;  // the destination is full: EPOLLOUT brings us back
      }
      if (f.eof) {
        shutdown(f.to, SHUT_WR);  // the end of this direction, passed on
        f.done = true;
        return;
      }
      return;  // nothing to read now
    }
  }

  static void release(Pair& p) {
    for (auto& f : p.flows) close(f.pipe_r), close(f.pipe_w);
    close(p.a), close(p.b);  // closing removes them from the epoll set
  }

  void deliver(std::vector<Ended> ended) {
    auto box = std::make_shared<std::vector<Ended>>(std::move(ended));
    tsfn_.NonBlockingCall([box](Napi::Env env, Napi::Function fn) {
      if (env == nullptr || fn.IsEmpty()) return;
      napi_handle_scope scope;
      if (napi_open_handle_scope(env, &scope) != napi_ok) return;
      // plain C API: a terminating environment must not turn a refused call into a fatal error (see demand.h)
      napi_value arr = new_float64_array(env, box->size() * 3, [&](double* d) {
        for (size_t i = 0; i < box->size(); i++) d[i * 3] = (*box)[i].id, d[i * 3 + 1] = (*box)[i].a_to_b, d[i * 3 + 2] = (*box)[i].b_to_a;
      });
      if (arr) call_js(env, fn, {arr});
      napi_close_handle_scope(env, scope);
    });
  }

  int ep_ = -1, stop_fd_ = -1;
  std::mutex mu_;
  std::unordered_map<uint32_t, std::unique_ptr<Pair>> pairs_;
  uint32_t next_id_ = 0;
  Napi::ThreadSafeFunction tsfn_;
  std::thread thread_;
  clockid_t cpu_clock_{};
  bool cpu_clock_ok_ = false;
};

// new Relay(onEnded(Float64Array of [id, bytesClientToUpstream, bytesUpstreamToClient]*));
// add(clientFd, upstreamFd) -> id; cpuMs; active; close().
class Relay : public Napi::ObjectWrap<Relay> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "Relay", {
        InstanceMethod("add", &Relay::Add),
        InstanceMethod("close", &Relay::Close),
        InstanceAccessor("cpuMs", &Relay::CpuMs, nullptr),
        InstanceAccessor("active", &Relay::Active, nullptr),
    });
  }
  explicit Relay(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Relay>(info) {
    if (info.Length() < 1 || !info[0].IsFunction()) throw Napi::TypeError::New(info.Env(), "expected onEnded");
    thread_ = std::make_unique<RelayThread>(info.Env(), info[0].As<Napi::Function>());
    napi_add_env_cleanup_hook(info.Env(), &Relay::Cleanup, this);
  }
  ~Relay() override { Shutdown(); }

 private:
  static void Cleanup(void* arg) { static_cast<Relay*>(arg)->Shutdown(); }
  void Shutdown() {
    if (!thread_) return;
    napi_remove_env_cleanup_hook(Env(), &Relay::Cleanup, this);
    thread_.reset();
  }
  Napi::Value Add(const Napi::CallbackInfo& info) {
    auto env = info.Env();
    if (!thread_) throw lib_error(env, "ERR_UFFD_CLOSED", "this relay is closed");
    if (info.Length() < 2 || !info[0].IsNumber() || !info[1].IsNumber()) throw Napi::TypeError::New(env, "expected (clientFd, upstreamFd)");
    return Napi::Number::New(env, thread_->add(env, info[0].As<Napi::Number>().Int32Value(), info[1].As<Napi::Number>().Int32Value()));
  }
  Napi::Value Close(const Napi::CallbackInfo& info) {
    Shutdown();
    return info.Env().Undefined();
  }
  Napi::Value CpuMs(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), thread_ ? thread_->cpu_ms() : 0); }
  Napi::Value Active(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), thread_ ? (double)thread_->active() : 0); }
  std::unique_ptr<RelayThread> thread_;
};

}  // namespace

void init_relay_bindings(Napi::Env env, Napi::Object exports) { exports.Set("Relay", Relay::Define(env)); }

}  // namespace uffdm
