// The source's bulk send on a native thread: the agent (TypeScript) decides
// which runs of pages go next and hands them over in batches; this thread
// splits each run into frames, sends all-zero pages as ZERO ranges (no
// payload), and writes the others with writev straight from region memory
// (no copy in user space, no JavaScript per frame). Control frames the agent
// sends on the same connection go through the same queue, so the wire order
// is the order the agent asked for: a ROUND_END follows its round's pages.
//
// Bookkeeping the agent reads (sender.ts) is updated here, atomically, in the
// JS-owned bitmaps: destHas (the destination holds this version) and
// everSent (to count resends). After the hand-off a batch may name the
// pending map: each page is taken from it (atomically, as the demand thread
// does) before it goes, so a page goes at most once whichever thread wins.
//
// Why a thread: measured on loopback, the agent's loop spent ~25 % of its
// time in JavaScript around the writes of a 1 GiB round (zero split, frame
// headers, Buffer views, bitmaps, GC); here that work runs beside the loop.
#include <errno.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <unistd.h>

#include <deque>

#include "args.h"
#include "bindings.h"
#include "demand.h"
#include "errors.h"
#include "records.h"

namespace uffdm {

namespace {

constexpr uint8_t kMsgPages = 20, kMsgRanges = 21, kMsgBatch = 41, kRangeZero = 0;
constexpr uint32_t kMaxPagesPerFrame = 256;   // MAX_PAGES_PER_FRAME
constexpr size_t kZeroEntriesPerFrame = 8192; // RANGE_ENTRIES_PER_FRAME / 2 runs

enum : int {
  kEvDone = 1,    // a batch of runs went: (sequence, data pages, zero pages, pages sent before)
  kEvSent = 2,    // after the hand-off: (region, first, count) taken from the pending map and sent
  kEvIdle = 3,    // the queue is empty: (sequence of the last command done)
  kEvClosed = 7,  // a write failed: (errno); nothing more is written
};

struct Command {
  uint64_t seq = 0;
  std::vector<uint8_t> frame;  // a ready frame (control, ranges) ...
  uint32_t region = 0;         // ... or runs of one region's pages
  std::vector<uint32_t> runs;  // (first, count) pairs
  uint32_t frame_pages = kMaxPagesPerFrame;
  bool take_pending = false;
  size_t bytes = 0;            // what it adds to queuedBytes
};

class BulkWriterThread : public DemandThread {
 public:
  // link: plain, or sealed on this thread (an encrypted migration)
  BulkWriterThread(Napi::Env env, Napi::Function cb, int fd, std::vector<RegionView> regions, std::vector<uint32_t*> ever_sent,
                   std::unique_ptr<records::Link> link)
      : DemandThread(env, cb, "uffd-migrate:bulk-writer", "uffdm-bulk-tx"), fd_(fd), regions_(std::move(regions)),
        ever_sent_(std::move(ever_sent)), link_(std::move(link)) {
    kick_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (kick_fd_ < 0) throw sys_error(env, -errno, "eventfd");
    urgent_ = false;  // bulk work: at agentNice, like the agent's loop it replaces
    start();
  }
  ~BulkWriterThread() override {
    stop();
    close(fd_);
    close(kick_fd_);
  }

  void push(Command c) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      c.seq = ++submitted_;
      queued_bytes_ += c.bytes;
      queue_.push_back(std::move(c));
    }
    uint64_t one = 1;
    (void)!write(kick_fd_, &one, sizeof one);
  }

  // The pending maps (one per region) batches with take_pending read from; set before such a batch.
  void set_pending(std::vector<uint32_t*> pending) {
    std::lock_guard<std::mutex> lock(mu_);
    pending_ = std::move(pending);
  }

  // The destination reads BATCH (REGIONS_OK said so): announce each gathered writev of several frames.
  void set_announce(bool on) { announce_.store(on); }

  uint64_t submitted() {
    std::lock_guard<std::mutex> lock(mu_);
    return submitted_;
  }

  std::atomic<uint64_t> bytes_written_{0};
  std::atomic<uint64_t> queued_bytes_{0};

 private:
  void run() override {
    for (;;) {
      Command c;
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (!queue_.empty()) {
          c = std::move(queue_.front());
          queue_.pop_front();
        }
      }
      if (c.seq == 0) {
        emit_idle();
        pollfd p[2] = {{stop_fd_, POLLIN, 0}, {kick_fd_, POLLIN, 0}};
        if (poll(p, 2, -1) < 0 && errno != EINTR) return;
        if (p[0].revents || stopping_) return;
        uint64_t v;
        (void)!read(kick_fd_, &v, sizeof v);
        continue;
      }
      bool ok = failed_ ? true : c.frame.empty() ? pages(c) : write_frame(c.frame.data(), c.frame.size());
      queued_bytes_ -= c.bytes;
      done_ = c.seq;
      if (!ok) return;  // stopping
    }
  }

  void emit_idle() {
    if (done_ != idle_said_) {
      idle_said_ = done_;
      emit({kEvIdle, (double)done_, 0, 0, 0});
    }
    flush();
  }

  // false: the thread is stopping. A failed write is reported once; later commands are dropped (counted done).
  bool write_iov(iovec* iov, int n, size_t bytes) {
    if (failed_) return true;
    int err = 0;
    if (!link_->write_all(fd_, stop_fd_, iov, n, &err)) {
      if (err == ECANCELED) return false;
      failed_ = true;
      emit({kEvClosed, (double)err, 0, 0, 0});
      flush();
      return true;
    }
    bytes_written_ += bytes;
    return true;
  }

  bool write_frame(const uint8_t* p, size_t n) {
    if (!write_gathered()) return false;
    iovec iov = {(void*)p, n};
    return write_iov(&iov, 1, n);
  }

  // One batch of runs; false: stopping.
  bool pages(const Command& c) {
    if (c.region >= regions_.size()) return true;  // checked by the binding; defensive
    const RegionView& r = regions_[c.region];
    uint32_t* pending = c.take_pending && c.region < pending_.size() ? pending_[c.region] : nullptr;
    if (c.take_pending && !pending) return true;
    stats_ = {};
    zero_.clear();
    bool ok = true;
    for (size_t k = 0; ok && k + 1 < c.runs.size(); k += 2) {
      uint32_t first = c.runs[k], count = c.runs[k + 1];
      if (count == 0 || first >= r.pages || count > r.pages - first) continue;
      if (pending) {
        // a page taken here is ours to send: the demand thread (or a later batch) will not send it again
        for (uint32_t s = first; ok && s < first + count; s += c.frame_pages) {
          uint32_t n = std::min(c.frame_pages, first + count - s);
          take_runs(pending, s, n, [&](uint32_t a, uint32_t b) {
            if (ok) ok = chunk(c.region, a, b - a);
            emit({kEvSent, (double)c.region, (double)a, (double)(b - a), 0});
          });
        }
      } else {
        for (uint32_t s = first; ok && s < first + count; s += c.frame_pages)
          ok = chunk(c.region, s, std::min(c.frame_pages, first + count - s));
      }
    }
    if (ok) ok = flush_zero(c.region);
    emit({kEvDone, (double)c.seq, (double)stats_.data, (double)stats_.zero, (double)stats_.resent});
    flush();
    return ok;
  }

  // At most one frame's pages: zero runs join the pending ZERO ranges, the others the gathered PAGES frames.
  bool chunk(uint32_t region, uint32_t first, uint32_t n) {
    const RegionView& r = regions_[region];
    const size_t ps = page_size();
    bool zero[kMaxPagesPerFrame];
    for (uint32_t i = 0; i < n; i++) zero[i] = page_is_zero(r.m->base + (size_t)(first + i) * ps, ps);
    for (uint32_t i = 0; i < n;) {
      bool z = zero[i];
      uint32_t j = i + 1;
      while (j < n && zero[j] == z) j++;
      uint32_t p = first + i, cnt = j - i;
      if (z) {
        zero_.push_back(p), zero_.push_back(cnt);
        stats_.zero += cnt;
        if (zero_.size() >= 2 * kZeroEntriesPerFrame && !flush_zero(region)) return false;
      } else {
        if (!gather(region, p, cnt)) return false;
        stats_.data += cnt;
        stats_.resent += cnt - set_range(ever_sent_[region], p, cnt);
        set_range(r.bits, p, cnt);  // destHas
      }
      i = j;
    }
    return true;
  }

  // A PAGES frame joins the gathered ones; they go with one writev when kGatherFrames or kGatherBytes are
  // reached, before any other frame and at the end of the batch. A guest with a zero page every few pages
  // makes frames of a few pages: written one by one, the syscalls (and the reader's wake-ups they cause) cost
  // more than the copies.
  bool gather(uint32_t region, uint32_t first, uint32_t cnt) {
    const size_t ps = page_size();
    uint8_t* hdr = gathered_hdrs_[gathered_frames_];
    put_u32(hdr, 1 + 12 + cnt * (uint32_t)ps);
    hdr[4] = kMsgPages;
    put_u32(hdr + 5, region), put_u32(hdr + 9, first), put_u32(hdr + 13, cnt);
    gathered_iov_[1 + 2 * gathered_frames_] = {hdr, 17};
    gathered_iov_[2 + 2 * gathered_frames_] = {regions_[region].m->base + (size_t)first * ps, cnt * ps};
    gathered_frames_++, gathered_bytes_ += 17 + cnt * ps;
    return gathered_frames_ < kGatherFrames && gathered_bytes_ < kGatherBytes ? true : write_gathered();
  }

  // Several frames in one writev go after a BATCH frame that announces their bytes: the reader may then wait for
  // all of them before it wakes (SO_RCVLOWAT), as it does for one large frame. Written in the same writev, so the
  // promise is never for bytes this side could hold back.
  bool write_gathered() {
    if (gathered_frames_ == 0) return true;
    int n = 2 * (int)gathered_frames_;
    size_t bytes = gathered_bytes_;
    iovec* iov = gathered_iov_ + 1;
    if (gathered_frames_ > 1 && announce_.load(std::memory_order_relaxed)) {
      put_u32(batch_hdr_, 5);
      batch_hdr_[4] = kMsgBatch;
      put_u32(batch_hdr_ + 5, (uint32_t)bytes);
      gathered_iov_[0] = {batch_hdr_, sizeof batch_hdr_};
      iov = gathered_iov_, n++, bytes += sizeof batch_hdr_;
    }
    gathered_frames_ = 0, gathered_bytes_ = 0;
    return write_iov(iov, n, bytes);
  }

  // The pending ZERO ranges of this batch as RANGES frames (destHas marked, like sendRanges()).
  bool flush_zero(uint32_t region) {
    if (!write_gathered()) return false;
    if (zero_.empty()) return true;
    std::vector<uint8_t> f(10 + zero_.size() * 4);
    put_u32(f.data(), (uint32_t)(f.size() - 4));
    f[4] = kMsgRanges, f[5] = kRangeZero;
    put_u32(&f[6], region);
    for (size_t k = 0; k < zero_.size(); k++) put_u32(&f[10 + k * 4], zero_[k]);
    bool ok = write_frame(f.data(), f.size());
    for (size_t k = 0; k < zero_.size(); k += 2) set_range(regions_[region].bits, zero_[k], zero_[k + 1]);
    zero_.clear();
    return ok;
  }

  int fd_, kick_fd_ = -1;
  std::vector<RegionView> regions_;  // bits: destHas
  std::vector<uint32_t*> ever_sent_, pending_;
  std::unique_ptr<records::Link> link_;
  std::mutex mu_;
  std::deque<Command> queue_;
  uint64_t submitted_ = 0, done_ = 0, idle_said_ = 0;
  bool failed_ = false;
  struct {
    uint32_t data, zero, resent;
  } stats_ = {};
  std::vector<uint32_t> zero_;
  static constexpr size_t kGatherFrames = 64, kGatherBytes = 1 << 20;
  uint8_t gathered_hdrs_[kGatherFrames][17];
  iovec gathered_iov_[1 + 2 * kGatherFrames];  // [0]: the BATCH frame, when there is one
  uint8_t batch_hdr_[9];
  std::atomic<bool> announce_{false};
  size_t gathered_frames_ = 0, gathered_bytes_ = 0;
};

// new BulkWriter(socketFd, regionIds, destHas, everSent, onEvents(events), seal?);
//   seal: { send: SealState } (an encrypted migration): the thread seals what it writes itself, from
//   region memory into records (native/records.h): the pages' one copy is the encryption's output.
// frame(bytes) -> seq; pages(region, runs: Uint32Array, framePages, takePending) -> seq; setPending(bitmaps);
// bytesWritten, queuedBytes, submitted; close() -> events left.
class BulkWriter : public ThreadWrap<BulkWriter> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "BulkWriter", {
        InstanceMethod("frame", &BulkWriter::Frame),
        InstanceMethod("pages", &BulkWriter::Pages),
        InstanceMethod("setPending", &BulkWriter::SetPending),
        InstanceMethod("announceBatches", &BulkWriter::AnnounceBatches),
        InstanceMethod("close", &BulkWriter::Close),
        InstanceAccessor("bytesWritten", &BulkWriter::BytesWritten, nullptr),
        InstanceAccessor("queuedBytes", &BulkWriter::QueuedBytes, nullptr),
        InstanceAccessor("cpuMs", &BulkWriter::CpuMs, nullptr),
    });
  }
  explicit BulkWriter(const Napi::CallbackInfo& info) : ThreadWrap<BulkWriter>(info) {
    auto env = info.Env();
    if (info.Length() < 5 || !info[0].IsNumber() || !info[4].IsFunction())
      throw Napi::TypeError::New(env, "expected (socketFd, regionIds, destHas, everSent, onEvents)");
    auto views = region_views(info, 1, &keep_);
    auto ever = bitmap_words(info, 3, views, &keep_);
    pages_.reserve(views.size());
    for (auto& v : views) pages_.push_back(v.pages);
    auto link = records::link_arg(info, 5);
    int fd = dup_socket(env, info[0]);
    thread_ = std::make_unique<BulkWriterThread>(env, info[4].As<Napi::Function>(), fd, std::move(views), std::move(ever), std::move(link));
  }

 private:
  BulkWriterThread* writer(Napi::Env env) {
    if (!thread_) throw lib_error(env, "ERR_UFFD_CLOSED", "this bulk writer is closed");
    return static_cast<BulkWriterThread*>(thread_.get());
  }
  Napi::Value Frame(const Napi::CallbackInfo& info) {
    auto w = writer(info.Env());
    Command c;
    c.frame = bytes_arg(info, 0);
    if (c.frame.empty()) throw Napi::TypeError::New(info.Env(), "expected a non-empty Uint8Array frame");
    c.bytes = c.frame.size();
    w->push(std::move(c));
    return Napi::Number::New(info.Env(), (double)w->submitted());
  }
  Napi::Value Pages(const Napi::CallbackInfo& info) {
    auto env = info.Env();
    auto w = writer(env);
    if (info.Length() < 2 || !info[0].IsNumber() || !info[1].IsTypedArray() ||
        info[1].As<Napi::TypedArray>().TypedArrayType() != napi_uint32_array)
      throw Napi::TypeError::New(env, "expected (region, runs: Uint32Array, framePages?, takePending?)");
    Command c;
    c.region = info[0].As<Napi::Number>().Uint32Value();
    if (c.region >= pages_.size()) throw Napi::RangeError::New(env, "no such region index");
    auto runs = info[1].As<Napi::Uint32Array>();
    c.runs.assign(runs.Data(), runs.Data() + runs.ElementLength());
    if (info.Length() > 2 && info[2].IsNumber()) c.frame_pages = std::clamp<uint32_t>(info[2].As<Napi::Number>().Uint32Value(), 1, kMaxPagesPerFrame);
    c.take_pending = arg_bool(info, 3, "takePending", false);
    for (size_t k = 0; k + 1 < c.runs.size(); k += 2) c.bytes += (size_t)c.runs[k + 1] * page_size();
    w->push(std::move(c));
    return Napi::Number::New(env, (double)w->submitted());
  }
  Napi::Value SetPending(const Napi::CallbackInfo& info) {
    auto w = writer(info.Env());
    std::vector<RegionView> shape;
    for (uint32_t n : pages_) shape.push_back(RegionView{nullptr, n, nullptr});
    w->set_pending(bitmap_words(info, 0, shape, &keep_));
    return info.Env().Undefined();
  }
  Napi::Value AnnounceBatches(const Napi::CallbackInfo& info) {
    writer(info.Env())->set_announce(arg_bool(info, 0, "announce", true));
    return info.Env().Undefined();
  }
  Napi::Value BytesWritten(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), thread_ ? (double)static_cast<BulkWriterThread*>(thread_.get())->bytes_written_.load() : 0);
  }
  Napi::Value QueuedBytes(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), thread_ ? (double)static_cast<BulkWriterThread*>(thread_.get())->queued_bytes_.load() : 0);
  }
  std::vector<uint32_t> pages_;
};

}  // namespace

void init_bulk_writer_bindings(Napi::Env env, Napi::Object exports) { exports.Set("BulkWriter", BulkWriter::Define(env)); }

}  // namespace uffdm
