// See demand.h. Wire format (docs/protocol.md): frames are u32 length (type +
// payload, big-endian) | u8 type | payload. On the demand connection the
// destination sends PAGE_REQUEST (30): u8 kind | u32 region | (u32 first,
// u32 count)*, and the source answers PAGES (20): u32 region | u32 first |
// u32 count | count pages. Nothing else travels there.
#include "demand.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <unordered_map>

#include "args.h"
#include "bindings.h"
#include "errors.h"
#include "page_maps.h"
#include "thread_util.h"
#include "uffd.h"

namespace uffdm {

namespace {

constexpr uint8_t kMsgPages = 20;
constexpr uint8_t kMsgPageRequest = 30;
constexpr uint8_t kKindFault = 1;
// Pages per reply frame: what one installs at a time (and what the staging buffer holds).
constexpr uint32_t kFramePages = 64;
// A request frame carries at most this many runs (a batch of faults read at once).
constexpr uint32_t kMaxRequestRuns = 4096;

// Event kinds, in the order of src/agent/demand.ts.
enum : int {
  kEvFault = 1,      // source: (region, first page of a requested run)
  kEvSent = 2,       // source: (region, first, count) sent on demand
  kEvArrived = 3,    // destination: (region, first, count) installed here (c: pages newly marked received)
  kEvLatency = 4,    // destination: (fault to install, us; b: 0 = installed from this thread's reply, 1 = by the push)
  kEvZeroFault = 5,  // destination: a fault on a page that is local (known zero): zero-filled here
  kEvNetFault = 6,   // destination: (region, page, pages asked: 1 + read-ahead) asked of the source
  kEvClosed = 7,     // either: the connection ended (a: errno, 0 = end of stream; b: 1 = protocol violation)
  kEvCpu = 8,        // either, as the thread ends: its CPU time (user + system), ms
};

}  // namespace

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
        emit({kEvCpu, ts.tv_sec * 1e3 + ts.tv_nsec / 1e6, 0, 0, 0});  // what this thread cost (the report's CPU figures)
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

namespace {

// Reads one frame at a time from a non-blocking socket into a header buffer and a payload buffer.
struct FrameReader {
  uint8_t hdr[17], next[5];
  size_t hdr_have = 0, body_have = 0, body_need = 0, next_have = 0;
  bool sized = false;  // the frame's first five bytes were read and checked
};

// ---- source: answers page requests from region memory ------------------------------

class DemandServerThread : public DemandThread {
 public:
  // head: bytes the agent had read off the connection before handing it over (requests asked again at once
  // after a recovery); handled first.
  DemandServerThread(Napi::Env env, Napi::Function cb, int fd, std::vector<RegionView> regions, std::vector<uint8_t> head)
      : DemandThread(env, cb, "uffd-migrate:demand-server", "uffdm-demand-tx"), fd_(fd), regions_(std::move(regions)), head_(std::move(head)) {
    flush_gap_us_ = kFlushGapUs;
    start();
  }
  ~DemandServerThread() override {
    stop();
    close(fd_);
  }

 private:
  void run() override {
    std::vector<uint8_t> in(std::max<size_t>(1 << 16, head_.size()));
    size_t have = head_.size();
    std::copy(head_.begin(), head_.end(), in.begin());
    for (bool first = true;; first = false) {
      if (!(first && have > 0)) {
        if (!wait_fd(fd_, POLLIN, stop_fd_, flush_timeout_ms(-1))) return;
        ssize_t n = read(fd_, in.data() + have, in.size() - have);
        if (n == 0) return closed(0, false);
        if (n < 0) {
          if (errno == EAGAIN || errno == EINTR) {
            flush();  // the poll's timeout: a deferred batch is due
            continue;
          }
          return closed(errno, false);
        }
        have += (size_t)n;
      }
      size_t off = 0;
      while (have - off >= 5) {
        uint32_t len = get_u32(&in[off]);
        if (len < 6 || len > 6 + kMaxRequestRuns * 8 || (len - 6) % 8 || in[off + 4] != kMsgPageRequest) return closed(EPROTO, true);
        if (have - off < 4 + len) {
          if (4 + len > in.size()) in.resize(4 + len);
          break;
        }
        if (!answer(&in[off + 5], len - 1)) return;
        off += 4 + len;
      }
      memmove(in.data(), in.data() + off, have - off);
      have -= off;
      flush();
    }
  }

  // payload: kind | region | runs; false when the thread must stop
  bool answer(const uint8_t* p, size_t len) {
    uint32_t region = get_u32(p + 1);
    if (region >= regions_.size()) return closed(EPROTO, true), false;
    const RegionView& r = regions_[region];
    const size_t ps = page_size();
    for (size_t k = 5; k < len; k += 8) {
      uint32_t first = get_u32(p + k), count = get_u32(p + k + 4);
      if (count == 0 || first >= r.pages || count > r.pages - first) return closed(EPROTO, true), false;
      emit({kEvFault, (double)region, (double)first, 0});
      bool ok = true;
      take_runs(r.bits, first, count, [&](uint32_t a, uint32_t b) {
        for (uint32_t s = a; s < b && ok; s += kFramePages) {
          uint32_t c = std::min(kFramePages, b - s);
          uint8_t hdr[17];
          put_u32(hdr, 1 + 12 + c * (uint32_t)ps);
          hdr[4] = kMsgPages;
          put_u32(hdr + 5, region), put_u32(hdr + 9, s), put_u32(hdr + 13, c);
          iovec iov[2] = {{hdr, sizeof hdr}, {r.m->base + (size_t)s * ps, c * ps}};
          int err = 0;
          if (!write_all(fd_, stop_fd_, iov, 2, &err)) {
            if (err != ECANCELED) closed(err, false);
            ok = false;
          }
          // sent or not, these pages left the pending map: a broken link is recovered from RECOVER_STATE
          emit({kEvSent, (double)region, (double)s, (double)c});
        }
      });
      if (!ok) return false;
    }
    return true;
  }

  void closed(int err, bool protocol) {
    emit({kEvClosed, (double)err, protocol ? 1.0 : 0.0, 0});
    flush(true);
  }

  int fd_;
  std::vector<RegionView> regions_;
  std::vector<uint8_t> head_;
};

// ---- destination: faults to requests, replies to installs --------------------------

class DemandClientThread : public DemandThread {
 public:
  DemandClientThread(Napi::Env env, Napi::Function cb, int uffd, std::vector<RegionView> regions)
      : DemandThread(env, cb, "uffd-migrate:demand-client", "uffdm-demand-rx"), uffd_(uffd), regions_(std::move(regions)) {
    const size_t ps = page_size();
    flush_gap_us_ = kFlushGapUs;
    kick_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (kick_fd_ < 0) throw sys_error(env, -errno, "eventfd");
    staging_ = (uint8_t*)aligned_alloc(ps, kFramePages * ps);
    for (auto& r : regions_) asked_.emplace_back((r.pages + 31) / 32, 0u);
    read_ahead_.resize(regions_.size());
    start();
  }
  ~DemandClientThread() override {
    stop();
    if (fd_ >= 0) close(fd_);
    if (next_fd_ >= 0) close(next_fd_);
    close(kick_fd_);
    free(staging_);
  }

  // A (new) connection to the source: the thread takes it over and asks again for every open fault.
  // -1: none (the link broke; faults are recorded and asked for on the next one).
  void attach(int fd) {
    {
      std::lock_guard<std::mutex> lock(attach_mu_);
      if (next_fd_ >= 0) close(next_fd_);
      next_fd_ = fd;
      attach_pending_ = true;
    }
    uint64_t one = 1;
    (void)!write(kick_fd_, &one, sizeof one);
  }

  // Pages ready() awaits (JS): asked on the demand connection like faults (one request per page), not timed as faults.
  void ask(uint32_t region, std::vector<uint32_t> pages) {
    {
      std::lock_guard<std::mutex> lock(attach_mu_);
      asks_.emplace_back(region, std::move(pages));
    }
    uint64_t one = 1;
    (void)!write(kick_fd_, &one, sizeof one);
  }

  // Microseconds the oldest open request has waited (0: none), for the stuck-source watchdog.
  double oldest_open_us() const { return oldest_open_us_.load(); }

 private:
  void run() override {
    std::vector<std::vector<uint32_t>> ask(regions_.size());
    while (!stopping_) {
      pollfd p[4] = {{uffd_, POLLIN, 0}, {fd_, POLLIN, 0}, {stop_fd_, POLLIN, 0}, {kick_fd_, POLLIN, 0}};
      int r = poll(p, 4, flush_timeout_ms(open_.empty() ? -1 : 1));
      if (r < 0 && errno != EINTR) return;
      if (p[2].revents) break;
      if (p[3].revents) take_new_link(ask);
      if (p[0].revents) read_faults(ask);
      for (size_t i = 0; i < ask.size(); i++) {
        if (!ask[i].empty()) send_request((uint32_t)i, ask[i]);
        ask[i].clear();
      }
      if (fd_ >= 0 && p[1].revents) read_replies();
      expire_open();
      flush();
    }
    // Stopping (the settled report follows): the faults answered since the last pass count too, however the loop
    // ended. stop() can land between that pass and the loop's test, after the last page arrived by the push.
    expire_open();
  }

  void take_new_link(std::vector<std::vector<uint32_t>>& ask) {
    uint64_t v;
    (void)!read(kick_fd_, &v, sizeof v);
    std::lock_guard<std::mutex> lock(attach_mu_);
    double t = now_us();
    for (auto& [region, pages] : asks_) {
      if (region >= regions_.size()) continue;
      for (uint32_t page : pages) {
        if (page >= regions_[region].pages || regions_[region].test(page) || (asked_[region][page >> 5] & (1u << (page & 31)))) continue;
        asked_[region][page >> 5] |= 1u << (page & 31);
        open_.emplace(key(region, page), Open{t, false});
        ask[region].push_back(page), ask[region].push_back(1);
      }
    }
    asks_.clear();
    if (!attach_pending_) return;
    attach_pending_ = false;
    drop_link();
    fd_ = next_fd_;
    next_fd_ = -1;
    fr_ = FrameReader();
    if (fd_ < 0) return;
    // the replies to what was asked on the old link may be lost: ask again
    std::vector<std::vector<uint32_t>> again(regions_.size());
    for (auto& [k, o] : open_) again[k >> 32].push_back((uint32_t)k), again[k >> 32].push_back(1);
    for (size_t i = 0; i < again.size(); i++) {
      if (!again[i].empty()) send_request((uint32_t)i, again[i]);
    }
  }

  void drop_link() {
    if (fd_ >= 0) close(fd_);
    fd_ = -1;
  }

  void read_faults(std::vector<std::vector<uint32_t>>& ask) {
    uffd_msg msgs[64];
    const size_t ps = page_size();
    for (;;) {
      ssize_t n = read(uffd_, msgs, sizeof msgs);
      if (n <= 0) return;
      double t = now_us();
      for (size_t i = 0; i < (size_t)n / sizeof(uffd_msg); i++) {
        if (msgs[i].event != UFFD_EVENT_PAGEFAULT) continue;
        uintptr_t addr = (uintptr_t)msgs[i].arg.pagefault.address & ~(uintptr_t)(ps - 1);
        for (uint32_t k = 0; k < regions_.size(); k++) {
          const RegionView& rv = regions_[k];
          if (addr < rv.m->addr() || addr >= rv.m->addr() + rv.m->size) continue;
          uint32_t page = (uint32_t)((addr - rv.m->addr()) / ps);
          if (rv.test(page)) {
            // local: known zero (or installed since the fault was raised: EEXIST, just wake)
            if (place(uffd_, rv.m->addr(), k, page, 1, nullptr)) emit({kEvZeroFault, (double)k, (double)page, 0, 0});
          } else if (!(asked_[k][page >> 5] & (1u << (page & 31)))) {
            asked_[k][page >> 5] |= 1u << (page & 31);
            open_.emplace(key(k, page), Open{t, true});
            uint32_t run = read_ahead(k, page);
            ask[k].push_back(page), ask[k].push_back(run);
            emit({kEvNetFault, (double)k, (double)page, (double)run, 0});
          }
          break;
        }
      }
      if ((size_t)n < sizeof msgs) return;
    }
  }

  // A fault at or just past the end of the previous fault's run in its region, every page in between here (a
  // thread reading on through memory the push has not reached, or has only partly), asks for a run twice as long
  // as that one, up to a reply frame (64 pages); any other fault for its own page. The source sends only the
  // run's pages still pending (each page at most once), so a page the push took meanwhile is not sent twice.
  // Bubbling keeps ahead of such a thread while it gets the CPU; when it does not (scan-service, a sequential 8 MiB
  // working set, another process keeping one of the two CPUs busy), 5.8-64 % of the touched pages faulted and the
  // workload took 41-117 ms; with this 1.8-1.9 % and 25-33 ms (5 alternating pairs). Random working sets: no change
  // beyond the noise (128 MiB, 3 pairs: 3.5-8.1 % vs 3.8-7.5 %).
  uint32_t read_ahead(uint32_t region, uint32_t page) {
    ReadAhead& ra = read_ahead_[region];
    const RegionView& rv = regions_[region];
    bool on = ra.end != UINT32_MAX && page >= ra.end && page - ra.end <= kFramePages;
    for (uint32_t q = ra.end; on && q < page; q++) on = rv.test(q);
    uint32_t run = std::min(on ? std::min(2 * ra.run, kFramePages) : 1u, rv.pages - page);
    ra.end = page + run, ra.run = run;
    return run;
  }

  // runs: (first page, pages) pairs
  void send_request(uint32_t region, const std::vector<uint32_t>& runs) {
    for (size_t i = 0; i + 1 < runs.size() && fd_ >= 0; i += 2 * kMaxRequestRuns) {
      size_t n = std::min<size_t>(kMaxRequestRuns, (runs.size() - i) / 2);
      std::vector<uint8_t> f(10 + n * 8);
      put_u32(f.data(), (uint32_t)(6 + n * 8));
      f[4] = kMsgPageRequest, f[5] = kKindFault;
      put_u32(&f[6], region);
      for (size_t j = 0; j < n; j++) put_u32(&f[10 + j * 8], runs[i + 2 * j]), put_u32(&f[14 + j * 8], runs[i + 2 * j + 1]);
      iovec iov = {f.data(), f.size()};
      int err = 0;
      if (!write_all(fd_, stop_fd_, &iov, 1, &err) && err != ECANCELED) link_broke(err, false);
    }
  }

  // Replies: PAGES frames only. Each frame's rest and the next frame's first five bytes come with one readv.
  void read_replies() {
    const size_t ps = page_size();
    FrameReader& fr = fr_;
    bool drained = false;
    auto fill = [&](std::initializer_list<ReadPart> parts, bool with_next) {
      if (std::all_of(parts.begin(), parts.end(), [](const ReadPart& p) { return *p.have >= p.need; })) return true;
      int r = read_parts(fd_, parts.begin(), (int)parts.size(), with_next ? fr.next : nullptr, &fr.next_have, 5);
      if (r < 0) link_broke(r == -EPIPE ? 0 : -r, false);
      drained = r == 2;
      return r > 0;
    };
    while (fd_ >= 0) {
      if (!fr.sized) {
        // a reply holds at least one page: its header and first page are read at once (the usual whole reply),
        // with five bytes more: the next reply's start, or more of this one's pages
        if (!fill({{fr.hdr, &fr.hdr_have, 17}, {staging_, &fr.body_have, ps}}, true)) return;
        uint32_t len = get_u32(fr.hdr);
        if (fr.hdr[4] != kMsgPages || len < 13 + ps || len > 13 + kFramePages * ps) return link_broke(EPROTO, true);
        fr.body_need = len - 13, fr.sized = true;
        if (fr.body_need > ps) {
          memcpy(staging_ + ps, fr.next, fr.next_have);
          fr.body_have += fr.next_have, fr.next_have = 0;
        }
      }
      if (!fill({{fr.hdr, &fr.hdr_have, 17}, {staging_, &fr.body_have, fr.body_need}}, true)) return;
      uint32_t len = get_u32(fr.hdr), region = get_u32(fr.hdr + 5), first = get_u32(fr.hdr + 9), count = get_u32(fr.hdr + 13);
      if (region >= regions_.size() || count == 0 || count > kFramePages || len != 13 + count * ps ||
          first >= regions_[region].pages || count > regions_[region].pages - first)
        return link_broke(EPROTO, true);
      install(region, first, count);
      // what came along begins the next reply (five bytes at most: never past its first page)
      memcpy(fr.hdr, fr.next, fr.next_have);
      fr.hdr_have = fr.next_have, fr.body_have = 0, fr.next_have = 0, fr.sized = false;
      if (drained) return;  // nothing more to read: poll, not a read that fails
    }
  }

  // The reply's pages that are not here yet go in with UFFDIO_COPY, straight from the staging buffer; then
  // they are marked received (after: a page marked received is one a fault may zero-fill, so it must be in).
  void install(uint32_t region, uint32_t first, uint32_t count) {
    const size_t ps = page_size();
    RegionView& rv = regions_[region];
    uint32_t end = first + count;
    for (uint32_t p = first; p < end;) {
      if (rv.test(p)) {
        p++;
        continue;
      }
      uint32_t q = p + 1;
      while (q < end && !rv.test(q)) q++;
      if (!place(uffd_, rv.m->addr(), region, p, q - p, staging_ + (size_t)(p - first) * ps)) return;
      p = q;
    }
    // the faulting threads woke as the pages went in: their latency ends now, not when expire_open() runs
    double t = now_us();
    for (uint32_t p = first; p < end && !open_.empty(); p++) {
      auto it = open_.find(key(region, p));
      if (it != open_.end() && it->second.replied == 0) it->second.replied = t;
    }
    uint32_t newly = set_range(rv.bits, first, count);
    emit({kEvArrived, (double)region, (double)first, (double)count, (double)newly});
  }

  // Open faults answered (by a reply here or by the push in JS): their latency, their asked bit.
  void expire_open() {
    if (open_.empty()) {
      oldest_open_us_ = 0;
      return;
    }
    double t = now_us(), oldest = 0;
    for (auto it = open_.begin(); it != open_.end();) {
      uint32_t region = (uint32_t)(it->first >> 32), page = (uint32_t)it->first;
      if (regions_[region].test(page)) {
        // a page the push installed is seen here, up to a poll timeout (1 ms) after it went in: an upper bound
        const Open& o = it->second;
        if (o.fault) emit({kEvLatency, (o.replied > 0 ? o.replied : t) - o.t, o.replied > 0 ? 0.0 : 1.0, 0, 0});
        asked_[region][page >> 5] &= ~(1u << (page & 31));
        it = open_.erase(it);
      } else {
        oldest = std::max(oldest, t - it->second.t);
        ++it;
      }
    }
    oldest_open_us_ = oldest;
  }

  // The connection failed: faults go on being read and recorded, and are asked for again on the next link.
  void link_broke(int err, bool protocol) {
    drop_link();
    emit({kEvClosed, (double)err, protocol ? 1.0 : 0.0, 0, 0});
    flush(true);
  }

  static uint64_t key(uint32_t region, uint32_t page) { return (uint64_t)region << 32 | page; }

  int uffd_, fd_ = -1;
  int kick_fd_ = -1;
  std::mutex attach_mu_;
  int next_fd_ = -1;
  bool attach_pending_ = false;
  FrameReader fr_;
  std::vector<RegionView> regions_;
  std::vector<std::vector<uint32_t>> asked_;
  struct ReadAhead {
    uint32_t end = UINT32_MAX;  // the page after the last fault's run
    uint32_t run = 1;
  };
  std::vector<ReadAhead> read_ahead_;  // per region
  // Asked and not here yet: when, and whether a thread is blocked on it (a fault) or ready() awaits it.
  struct Open {
    double t;
    bool fault;
    double replied = 0;  // when this thread's reply installed the page (0: not by a reply)
  };
  std::unordered_map<uint64_t, Open> open_;
  std::vector<std::pair<uint32_t, std::vector<uint32_t>>> asks_;  // from ask(), under attach_mu_
  std::atomic<double> oldest_open_us_{0};
  uint8_t* staging_ = nullptr;
};

// ---- JS classes ----------------------------------------------------------------------

}  // namespace

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

namespace {

// new DemandServer(socketFd, regionIds, pendingBitmaps, onEvents): answers page requests on its own thread.
class DemandServer : public ThreadWrap<DemandServer> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "DemandServer", {InstanceMethod("close", &DemandServer::Close)});
  }
  explicit DemandServer(const Napi::CallbackInfo& info) : ThreadWrap<DemandServer>(info) {
    auto env = info.Env();
    if (info.Length() < 4 || !info[3].IsFunction()) throw Napi::TypeError::New(env, "expected (fd, regionIds, pending, onEvents)");
    auto views = region_views(info, 1, &keep_);
    std::vector<uint8_t> head = bytes_arg(info, 4);
    int fd = dup_socket(env, info[0]);
    thread_ = std::make_unique<DemandServerThread>(env, info[3].As<Napi::Function>(), fd, std::move(views), std::move(head));
  }
};

// new DemandClient(uffdFd, regionIds, receivedBitmaps, onEvents); attach(socketFd | -1); oldestOpenUs.
class DemandClient : public ThreadWrap<DemandClient> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "DemandClient", {
        InstanceMethod("attach", &DemandClient::Attach),
        InstanceMethod("ask", &DemandClient::Ask),
        InstanceMethod("close", &DemandClient::Close),
        InstanceAccessor("oldestOpenUs", &DemandClient::OldestOpenUs, nullptr),
    });
  }
  explicit DemandClient(const Napi::CallbackInfo& info) : ThreadWrap<DemandClient>(info) {
    auto env = info.Env();
    if (info.Length() < 4 || !info[0].IsNumber() || !info[3].IsFunction())
      throw Napi::TypeError::New(env, "expected (uffdFd, regionIds, received, onEvents)");
    auto views = region_views(info, 1, &keep_);
    thread_ = std::make_unique<DemandClientThread>(env, info[3].As<Napi::Function>(), info[0].As<Napi::Number>().Int32Value(), std::move(views));
  }

 private:
  DemandClientThread* client() { return static_cast<DemandClientThread*>(thread_.get()); }
  Napi::Value Attach(const Napi::CallbackInfo& info) {
    auto env = info.Env();
    if (!thread_) throw lib_error(env, "ERR_UFFD_CLOSED", "this demand path is closed");
    int fd = -1;
    if (info.Length() > 0 && info[0].IsNumber() && info[0].As<Napi::Number>().Int32Value() >= 0) fd = dup_socket(env, info[0]);
    client()->attach(fd);
    return env.Undefined();
  }
  // ask(regionIndex, pages: Uint32Array): pages ready() awaits, asked for on the demand connection
  Napi::Value Ask(const Napi::CallbackInfo& info) {
    auto env = info.Env();
    if (!thread_) throw lib_error(env, "ERR_UFFD_CLOSED", "this demand path is closed");
    uint32_t region = (uint32_t)arg_index(info, 0, "region", 4294967295.0);
    if (info.Length() < 2 || !info[1].IsTypedArray() || info[1].As<Napi::TypedArray>().TypedArrayType() != napi_uint32_array)
      throw Napi::TypeError::New(env, "expected pages to be a Uint32Array");
    auto pages = info[1].As<Napi::Uint32Array>();
    client()->ask(region, std::vector<uint32_t>(pages.Data(), pages.Data() + pages.ElementLength()));
    return env.Undefined();
  }
  Napi::Value OldestOpenUs(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), thread_ ? client()->oldest_open_us() : 0);
  }
};

}  // namespace

void init_demand_bindings(Napi::Env env, Napi::Object exports) {
  exports.Set("DemandServer", DemandServer::Define(env));
  exports.Set("DemandClient", DemandClient::Define(env));
}

}  // namespace uffdm
