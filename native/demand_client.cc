// The destination's end of the demand connection (demand.h): a thread that turns faults into page requests
// and installs the replies straight from the buffer the socket read into.
#include "demand.h"

#include <errno.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <unistd.h>

#include <unordered_map>

#include "args.h"
#include "demand_wire.h"
#include "errors.h"
#include "next_link.h"
#include "records.h"
#include "uffd.h"

namespace uffdm {

using namespace demand_wire;

namespace {

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
    close(kick_fd_);
    free(staging_);
  }

  // A (new) connection to the source: the thread takes it over and asks again for every open fault. link: plain,
  // or sealed on this thread (an encrypted migration). -1: none (the link broke; faults are recorded and asked for
  // on the next one). Returns its id, which its CLOSED event carries (JS drops one that reached it after the next attach).
  uint32_t attach(int fd, std::unique_ptr<records::Link> link) {
    uint32_t id;
    {
      std::lock_guard<std::mutex> lock(attach_mu_);
      id = next_.offer(fd, std::move(link));
    }
    uint64_t one = 1;
    (void)!write(kick_fd_, &one, sizeof one);
    return id;
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
      // (plaintext a sealed link opened already is read without waiting for the socket)
      int r = poll(p, 4, link_->pending() ? 0 : flush_timeout_ms(open_.empty() ? -1 : 1));
      if (r < 0 && errno != EINTR) return;
      if (p[2].revents) break;
      if (p[3].revents) take_new_link(ask);
      if (p[0].revents) read_faults(ask);
      for (size_t i = 0; i < ask.size(); i++) {
        if (!ask[i].empty()) send_request((uint32_t)i, ask[i]);
        ask[i].clear();
      }
      if (fd_ >= 0 && (p[1].revents || link_->pending())) read_replies();
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
    int fd;
    std::unique_ptr<records::Link> link;
    if (!next_.take(&fd, &link, &link_id_)) return;
    drop_link();
    fd_ = fd;
    link_ = std::move(link);
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
    asked_on_link_ = false;
    link_ = std::make_unique<records::Link>();  // (a failed sealed link stays "pending": the poll must not spin on it)
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
      asked_on_link_ = true;
      iovec iov = {f.data(), f.size()};
      int err = 0;
      if (!link_->write_all(fd_, stop_fd_, &iov, 1, &err) && err != ECANCELED) link_broke(err, records::kEnded);
    }
  }

  // Replies: PAGES frames only. Each frame's rest and the next frame's first five bytes come with one readv.
  void read_replies() {
    const size_t ps = page_size();
    FrameReader& fr = fr_;
    bool drained = false;
    auto fill = [&](std::initializer_list<ReadPart> parts, bool with_next) {
      if (std::all_of(parts.begin(), parts.end(), [](const ReadPart& p) { return *p.have >= p.need; })) return true;
      int r = link_->read_parts(fd_, parts.begin(), (int)parts.size(), with_next ? fr.next : nullptr, &fr.next_have, 5);
      if (r < 0) link_broke(r == -EPIPE ? 0 : -r, link_->how(r));
      drained = r == 2;
      return r > 0;
    };
    while (fd_ >= 0) {
      if (!fr.sized) {
        // a reply holds at least one page: its header and first page are read at once (the usual whole reply),
        // with five bytes more: the next reply's start, or more of this one's pages
        if (!fill({{fr.hdr, &fr.hdr_have, 17}, {staging_, &fr.body_have, ps}}, true)) return;
        uint32_t len = get_u32(fr.hdr);
        if (fr.hdr[4] != kMsgPages || len < 13 + ps || len > 13 + kFramePages * ps) return link_broke(EPROTO, records::kMalformed);
        // A reply before this side asked anything on this connection: no source sends one (it answers requests,
        // which follow the hand-off). Installed, it would race with what owns the memory before the hand-off (the
        // bulk reader's drops, the discard list): a page marked missing with bytes in it (found by the fuzzer).
        if (!asked_on_link_) return link_broke(EPROTO, records::kMalformed);
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
        return link_broke(EPROTO, records::kMalformed);
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

  // The connection failed (how: records.h's kEnded, kMalformed, ...): faults go on being read and recorded, and are
  // asked for again on the next link.
  void link_broke(int err, int how) {
    drop_link();
    emit({kEvClosed, (double)err, (double)how, (double)link_id_, 0});
    flush(true);
  }

  static uint64_t key(uint32_t region, uint32_t page) { return (uint64_t)region << 32 | page; }

  int uffd_, fd_ = -1;
  bool asked_on_link_ = false;  // a request went out on fd_ (before it, a reply is a protocol breach)
  int kick_fd_ = -1;
  std::mutex attach_mu_;
  NextLink next_;          // under attach_mu_
  uint32_t link_id_ = 0;   // the connection fd_ is (this thread's)
  std::unique_ptr<records::Link> link_ = std::make_unique<records::Link>();
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

// new DemandClient(uffdFd, regionIds, receivedBitmaps, onEvents); attach(socketFd | -1, seal?); oldestOpenUs.
//   seal: { send, recv, cipherHead } (Channel.handOverSealed(true)): the thread seals and opens the connection itself.
class DemandClient : public ThreadWrap<DemandClient> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "DemandClient", {
        InstanceMethod("attach", &DemandClient::Attach),
        InstanceMethod("ask", &DemandClient::Ask),
        InstanceMethod("close", &DemandClient::Close),
        InstanceAccessor("oldestOpenUs", &DemandClient::OldestOpenUs, nullptr),
        InstanceAccessor("cpuMs", &DemandClient::CpuMs, nullptr),
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
    auto link = records::link_arg(info, 1);
    if (info.Length() > 0 && info[0].IsNumber() && info[0].As<Napi::Number>().Int32Value() >= 0) fd = dup_socket(env, info[0]);
    return Napi::Number::New(env, client()->attach(fd, std::move(link)));
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

Napi::Function demand_wire::define_demand_client(Napi::Env env) { return DemandClient::Define(env); }

}  // namespace uffdm
