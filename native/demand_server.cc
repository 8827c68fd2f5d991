// The source's end of the demand connection (demand.h): a thread that answers page requests from region
// memory with writev, each page at most once (it takes them from the pending map).
#include "demand.h"

#include <errno.h>
#include <poll.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "demand_wire.h"
#include "records.h"

namespace uffdm {

using namespace demand_wire;

namespace {

class DemandServerThread : public DemandThread {
 public:
  // head: bytes the agent had read off the connection before handing it over (requests asked again at once
  // after a recovery); handled first.
  // link: plain, or sealed on this thread (an encrypted migration).
  DemandServerThread(Napi::Env env, Napi::Function cb, int fd, std::vector<RegionView> regions, std::vector<uint8_t> head, std::unique_ptr<records::Link> link)
      : DemandThread(env, cb, "uffd-migrate:demand-server", "uffdm-demand-tx"), fd_(fd), regions_(std::move(regions)), head_(std::move(head)),
        link_(std::move(link)) {
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
        // (plaintext a sealed link opened already is read without waiting for the socket)
        if (!link_->pending() && !wait_fd(fd_, POLLIN, stop_fd_, flush_timeout_ms(-1))) return;
        ssize_t n = link_->read(fd_, in.data() + have, in.size() - have);
        if (n == 0) return closed(0, records::kEnded);
        if (n < 0) {
          if (errno == EAGAIN || errno == EINTR) {
            flush();  // the poll's timeout: a deferred batch is due
            continue;
          }
          return closed(errno, link_->how(errno));
        }
        have += (size_t)n;
      }
      size_t off = 0;
      while (have - off >= 5) {
        uint32_t len = get_u32(&in[off]);
        if (len < 6 || len > 6 + kMaxRequestRuns * 8 || (len - 6) % 8 || in[off + 4] != kMsgPageRequest) return closed(EPROTO, records::kMalformed);
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
    if (region >= regions_.size()) return closed(EPROTO, records::kMalformed), false;
    const RegionView& r = regions_[region];
    const size_t ps = page_size();
    for (size_t k = 5; k < len; k += 8) {
      uint32_t first = get_u32(p + k), count = get_u32(p + k + 4);
      if (count == 0 || first >= r.pages || count > r.pages - first) return closed(EPROTO, records::kMalformed), false;
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
          if (!link_->write_all(fd_, stop_fd_, iov, 2, &err)) {
            if (err != ECANCELED) closed(err, records::kEnded);
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

  // how: records.h's kEnded, kMalformed, ...
  void closed(int err, int how) {
    emit({kEvClosed, (double)err, (double)how, 0});
    flush(true);
  }

  int fd_;
  std::vector<RegionView> regions_;
  std::vector<uint8_t> head_;
  std::unique_ptr<records::Link> link_;
};

// new DemandServer(socketFd, regionIds, pendingBitmaps, onEvents, head?, seal?): answers page requests on its own
// thread. seal: { send, recv, cipherHead } (Channel.handOverSealed(true)): the thread seals and opens the connection.
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
    auto link = records::link_arg(info, 5);
    int fd = dup_socket(env, info[0]);
    thread_ = std::make_unique<DemandServerThread>(env, info[3].As<Napi::Function>(), fd, std::move(views), std::move(head), std::move(link));
  }
};

}  // namespace

Napi::Function demand_wire::define_demand_server(Napi::Env env) { return DemandServer::Define(env); }

}  // namespace uffdm
