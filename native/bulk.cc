// The destination's bulk receive on a native thread: pre-copy rounds and
// the post-copy push arrive as PAGES and RANGES frames; this thread reads
// small frames many at a time into a buffer and large ones straight into a
// staging buffer, and installs the pages from there (see read_frames())
// (UFFDIO_COPY for a missing page, a plain copy over an older round's data,
// UFFDIO_ZEROPAGE or a discard for zero ranges, the zero pages while the
// socket has nothing to read: install_deferred()): one copy from the socket,
// one into place, no JavaScript per frame. The placement rules are those of
// src/agent/destination/placement.ts (the JS path of the pure tier and of
// UFFD_MIGRATE_BULK=js). Every other frame goes to JS in order with the
// events; after HANDOFF the thread stops reading until JS has applied the
// discard list and says post-copy began (resume()).
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <array>
#include <mutex>
#include <shared_mutex>

#include "discard.h"
#include "args.h"
#include "bindings.h"
#include "demand.h"
#include "errors.h"
#include "next_link.h"
#include "records.h"
#include "uffd.h"

namespace uffdm {

namespace {

constexpr uint8_t kMsgError = 4, kMsgPages = 20, kMsgRanges = 21, kMsgHandoff = 24, kMsgBatch = 41;
constexpr uint32_t kMaxPagesPerFrame = 256;              // MAX_PAGES_PER_FRAME
constexpr uint32_t kMaxControlBytes = 64u << 20;         // MAX_CONTROL_BYTES
constexpr uint8_t kRangeZero = 0, kRangeFree = 1, kRangeStale = 2;

// Before the hand-off the bulk reader and each extra stream's reader (threads of their own) write pages over in
// place. A page being written must not be dropped by another of them meanwhile: the copy would fault on a missing
// page and its thread wait in the kernel for a reply nobody sends; joined at the hand-off, it wedged the agent (a
// source that sent one page on two streams, one writing it, one dropping it: test/bulk-reader.test.ts). A real
// source keeps each page on one stream (its lane), so writers share this and drops (pre-copy RANGES) take it alone.
// Writer-preferring: with glibc's default (readers first) a drop could wait for as long as other streams keep
// writing; this way it waits for the frames being written now, at most.
class PrecopyWrites {
 public:
  PrecopyWrites() {
    pthread_rwlockattr_t attr;
    pthread_rwlockattr_init(&attr);
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&lock_, &attr);
    pthread_rwlockattr_destroy(&attr);
  }
  void lock_shared() { pthread_rwlock_rdlock(&lock_); }
  void unlock_shared() { pthread_rwlock_unlock(&lock_); }
  void lock() { pthread_rwlock_wrlock(&lock_); }
  void unlock() { pthread_rwlock_unlock(&lock_); }

 private:
  pthread_rwlock_t lock_;
};
PrecopyWrites g_precopy_writes;

enum : int {
  kEvArrived = 3,   // post-copy: (region, first, count, pages newly marked received)
  kEvClosed = 7,    // (errno, how: records.h's kEnded, kMalformed, kNotARecord, kTagFailed; the connection's id, attach()'s); errno 0 = end of stream
  kEvCpu = 8,       // as the thread ends: its CPU time, ms
  kEvReceived = 10, // pre-copy: (change of the received count: + placed, - dropped)
  kEvTwice = 11,    // post-copy: (pages that arrived again, already held)
};

class BulkReaderThread : public DemandThread {
 public:
  BulkReaderThread(Napi::Env env, Napi::Function cb, int uffd, std::vector<RegionView> regions, std::vector<uint32_t*> zero,
                   std::vector<uint32_t*> freed, int fd, std::vector<uint8_t> head, bool lazy_zero, std::unique_ptr<records::Link> link)
      : DemandThread(env, cb, "uffd-migrate:bulk", "uffdm-bulk-rx"), uffd_(uffd), regions_(std::move(regions)),
        zero_(std::move(zero)), freed_(std::move(freed)), fd_(fd), head_(std::move(head)), lazy_zero_(lazy_zero),
        link_(std::move(link)) {
    link_->count_sealed_bytes(&sealed_read_);
    kick_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (kick_fd_ < 0) throw sys_error(env, -errno, "eventfd");
    urgent_ = false;  // bulk work: at agentNice, like the agent's loop it replaces
    flush_gap_us_ = kFlushGapUs;
    staging_ = (uint8_t*)aligned_alloc(page_size(), kMaxPagesPerFrame * page_size());
    take_head(std::move(head_));
    stats_fd_.store(fd_);
    start();
  }
  ~BulkReaderThread() override {
    stop();
    stats_fd_.store(-1);
    if (fd_ >= 0) close(fd_);
    close(kick_fd_);
    free(staging_);
  }

  // After HANDOFF: post-copy rules from now on, and reading goes on.
  void resume(bool postcopy) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      resume_pending_ = true;
      resume_postcopy_ = postcopy;
    }
    kick();
  }

  // A new bulk connection (after a recovery) with the bytes JS had read from it (and, sealed, how this thread opens
  // it); -1: none (the link broke). Returns its id: the CLOSED event of a connection carries its id, so that JS can
  // tell one that reached it late (the thread had moved on to the next connection) from the current one's.
  uint32_t attach(int fd, std::vector<uint8_t> head, std::unique_ptr<records::Link> link) {
    uint32_t id;
    {
      std::lock_guard<std::mutex> lock(mu_);
      id = next_.offer(fd, std::move(link));
      next_head_ = std::move(head);
    }
    kick();
    return id;
  }

 private:
  void kick() {
    uint64_t one = 1;
    (void)!write(kick_fd_, &one, sizeof one);
  }

  void run() override {
    while (!stopping_) {
      bool reading = fd_ >= 0 && !paused_;
      pollfd p[3] = {{reading ? fd_ : -1, POLLIN, 0}, {stop_fd_, POLLIN, 0}, {kick_fd_, POLLIN, 0}};
      // whole frames already buffered (bytes JS handed over, or read along before a pause) go first, and so does
      // plaintext a sealed link opened already
      if (reading) want_lowat();
      bool polled = !(reading && (frame_buffered() || link_->pending()));
      int timeout = flush_timeout_ms(-1);
      if (reading && batch_wait_) timeout = timeout < 0 ? kBatchWaitMs : std::min(timeout, kBatchWaitMs);
      // zero pages still to install: only a look at the socket, and they go in while nothing is there to read
      bool idle_work = reading && deferred_next_ < deferred_zero_.size();
      int r = polled ? poll(p, 3, idle_work ? 0 : timeout) : 0;
      if (r < 0 && errno != EINTR) return;
      if (polled && r == 0 && idle_work) {
        install_deferred(kDeferredRunsPerTurn);
        flush();
        continue;
      }
      if (polled && r == 0 && batch_wait_) promise_end_ = 0;  // slow, or it lied: read what is there
      if (p[1].revents) return;
      if (p[2].revents) take_commands();
      if (fd_ >= 0 && !paused_) read_frames();
      flush();
    }
  }

  // Before the hand-off, a large frame being read straight into staging wakes the thread once, when the rest of
  // it is there (SO_RCVLOWAT), rather than once per one or two socket buffers' worth: 1 GiB of 1 MiB frames took
  // ~8 polls and ~8 reads a frame, now ~1 of each (dense guest: destination CPU -20%, docs/data-plane.md). Only where the
  // sender is bound to send those bytes (the rest of a frame it began); 1 again otherwise. The kernel still wakes
  // the reader when its window closes, so a small buffer cannot hold it up; bytesRead counts queued bytes, so the
  // watchdog sees progress while they gather.
  //
  // The same for the bytes a BATCH frame announced (the sender's gathered writev of small frames), up to what the
  // next read can take. Where the reader outruns the link (8 Gbit/s namespace link, a guest of 7-page frames) it
  // used to wake per packet: destination CPU 1.15 -> 1.0 s/GiB. On loopback the reader is the slower side and
  // rarely waits, so nothing changes there.
  void want_lowat() {
    size_t want = 1;
    if (!postcopy_) {
      size_t frame = direct_ ? hdr_need_ - hdr_have_ + body_need_ - body_have_ : 0;
      uint64_t read = bytes_read_.load(std::memory_order_relaxed);
      size_t batch = promise_end_ > read ? (size_t)(promise_end_ - read) : 0;
      if (!direct_) batch = std::min(batch, buf_.size() - (buf_len_ - buf_pos_));
      want = std::max<size_t>(1, std::min(std::max(frame, batch), kLowatBytes));
      // sealed: the socket's bytes those need (a record begun needs its rest first, whatever it holds)
      want = std::min(link_->socket_bytes_for(want), kLowatBytes);
      // a frame's rest must come before anything can go on; a batch's frames could be placed as they come, so
      // its promise is waited on for kBatchWaitMs at most (a slow link, or a source that announced too much)
      batch_wait_ = batch > frame && want > 1;
    } else {
      batch_wait_ = false;
    }
    if ((int)want == lowat_) return;
    int v = (int)want;
    if (setsockopt(fd_, SOL_SOCKET, SO_RCVLOWAT, &v, sizeof v) == 0) lowat_ = v;
  }

  void take_commands() {
    uint64_t v;
    (void)!read(kick_fd_, &v, sizeof v);
    std::lock_guard<std::mutex> lock(mu_);
    if (resume_pending_) {
      resume_pending_ = false;
      postcopy_ = resume_postcopy_;
      paused_ = false;
    }
    int fd;
    if (next_.take(&fd, &link_, &link_id_)) {
      stats_fd_.store(-1);
      if (fd_ >= 0) close(fd_);
      fd_ = fd;
      link_->count_sealed_bytes(&sealed_read_);
      lowat_ = 1;
      promise_end_ = 0;
      stats_fd_.store(fd_);
      direct_ = false;
      take_head(std::move(next_head_));
    }
  }

  // Bytes JS read off the connection before handing it over: the buffer's first bytes.
  void take_head(std::vector<uint8_t> head) {
    buf_.resize(std::max(kBufBytes, head.size()));
    std::copy(head.begin(), head.end(), buf_.begin());
    buf_pos_ = 0, buf_len_ = head.size();
  }

  // The buffer holds a whole frame (or the start of one that is read directly): handle it before polling.
  bool frame_buffered() const {
    size_t avail = buf_len_ - buf_pos_;
    if (direct_ || avail < 5) return false;
    size_t total = 4 + (size_t)get_u32(&buf_[buf_pos_]);
    return avail >= total || total > kDirectBytes;
  }

  // Reads and handles frames until the socket would block, the link breaks or HANDOFF pauses it.
  //
  // Small frames (a run of a few pages between zero pages: 7 pages each for a guest with every 8th page zero)
  // are read many at a time into a buffer and installed from it: one read for many frames, not one or more
  // each. A large frame (> kDirectBytes) not all buffered is read straight into the staging buffer (its
  // buffered start copied there), and the same readv reads the next frame's length into the buffer: large
  // frames are not copied twice.
  void read_frames() {
    const size_t ps = page_size();
    bool drained = false;  // the last read found fewer bytes than it asked for: poll before reading again
    while (fd_ >= 0 && !paused_ && !stopping_) {
      if (direct_) {
        uint8_t* dst = type_ == kMsgPages ? staging_ : body_.data();
        const ReadPart parts[2] = {{hdr_, &hdr_have_, hdr_need_}, {dst, &body_have_, body_need_}};
        buf_pos_ = buf_len_ = 0;
        int r = link_->read_parts(fd_, parts, 2, buf_.data(), &buf_len_, 5, &bytes_read_);
        if (r < 0) return link_broke(r == -EPIPE ? 0 : -r, link_->how(r));
        if (r == 0) return;
        direct_ = false;
        last_large_ = true;
        if (!handle(hdr_, dst)) return;
        drained = r == 2;
        continue;
      }
      size_t avail = buf_len_ - buf_pos_;
      if (avail >= 5) {
        const uint8_t* f = &buf_[buf_pos_];
        len_ = get_u32(f), type_ = f[4];
        if (len_ < 1 || len_ > kMaxControlBytes + 1) return link_broke(EPROTO, records::kMalformed);
        if (type_ == kMsgPages && (len_ < 13 || len_ > 13 + kMaxPagesPerFrame * ps)) return reject(std::vector<uint8_t>());
        if (type_ == kMsgBatch && len_ != 5) return reject(std::vector<uint8_t>());  // JS names the error
        size_t total = 4 + (size_t)len_, hdr = type_ == kMsgPages ? 17 : 5;
        if (avail >= total) {
          buf_pos_ += total;
          last_large_ = false;
          if (!handle(f, const_cast<uint8_t*>(f) + hdr)) return;
          continue;
        }
        if (total > kDirectBytes) {
          // large and not all here: its start goes to the staging buffer (or body_), the rest is read straight
          // there; the buffer is empty then
          if (type_ != kMsgPages) body_.resize(len_ - 1);
          uint8_t* dst = type_ == kMsgPages ? staging_ : body_.data();
          hdr_need_ = hdr, hdr_have_ = std::min(avail, hdr);
          memcpy(hdr_, f, hdr_have_);
          body_need_ = total - hdr, body_have_ = std::min(avail - hdr_have_, body_need_);
          memcpy(dst, f + hdr_have_, body_have_);
          buf_pos_ += hdr_have_ + body_have_;
          direct_ = true;
          continue;
        }
      }
      // a partial small frame (or none): to the buffer's front, and read more after it
      if (drained) return;
      if (buf_pos_ > 0) {
        memmove(buf_.data(), &buf_[buf_pos_], avail);
        buf_pos_ = 0, buf_len_ = avail;
      }
      // after a large frame the next is likely large too: its header only, so that its pages are read straight
      // into staging, not read ahead here and copied there
      size_t ahead = last_large_ ? 17 : kReadAheadBytes;
      size_t want = std::min(buf_.size() - buf_len_, std::max(ahead, avail >= 5 ? 4 + (size_t)len_ - avail : 5));
      ssize_t n = link_->read(fd_, &buf_[buf_len_], want);
      if (n == 0) return link_broke(0, records::kEnded);
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno != EAGAIN) link_broke(errno, link_->how(errno));
        return;
      }
      bytes_read_ += (uint64_t)n;
      buf_len_ += (size_t)n;
      // (sealed: fewer bytes than asked may only mean the plaintext opened so far ran out)
      drained = (size_t)n < want && !link_->pending();
    }
  }

  // One whole frame: hdr (its first 5 bytes, 17 for PAGES), body (the rest). false: stop reading (rejected, or
  // HANDOFF/ERROR paused the thread).
  bool handle(const uint8_t* hdr, uint8_t* body) {
    const size_t ps = page_size();
    if (type_ == kMsgPages) {
      uint32_t region = get_u32(hdr + 5), first = get_u32(hdr + 9), count = get_u32(hdr + 13);
      if (!run_ok(region, first, count) || count > kMaxPagesPerFrame || len_ != 13 + count * ps) {
        reject(std::vector<uint8_t>(hdr + 5, hdr + 17));
        return false;
      }
      pages(region, first, count, body);
      return true;
    }
    if (type_ == kMsgBatch) {
      // the next n bytes were written with it: those already buffered are not waited for
      uint32_t n = get_u32(body);
      size_t buffered = buf_len_ - buf_pos_;
      promise_end_ = n > buffered ? bytes_read_.load(std::memory_order_relaxed) + (n - buffered) : 0;
      return true;
    }
    if (type_ == kMsgRanges) {
      if (ranges(body, len_ - 1)) return true;
      reject(std::vector<uint8_t>(body, body + len_ - 1));
      return false;
    }
    // everything before a control frame is in place when JS sees it (SYNC answers "applied"; HANDOFF)
    if (!install_deferred(SIZE_MAX)) return false;
    // a large frame read into body_ goes as it is (HANDOFF with its discard lists and state: megabytes)
    emit_frame(type_, body == body_.data() ? std::move(body_) : std::vector<uint8_t>(body, body + len_ - 1));
    body_ = {};
    if (type_ == kMsgHandoff) paused_ = true;  // until JS applied the discard list (resume())
    if (type_ == kMsgError) paused_ = true;    // the source gave up: JS ends the session
    return !paused_;
  }

  // A frame that breaks the rules goes to JS as it came (a PAGES frame: its header), where the message table and
  // the decoders name what is wrong and answer ERROR, as on the JS path; nothing more is read.
  void reject(std::vector<uint8_t> payload) {
    emit_frame(type_, std::move(payload));
    body_ = {};
    paused_ = true;
  }

  bool run_ok(uint32_t region, uint32_t first, uint32_t count) const {
    return region < regions_.size() && count > 0 && first < regions_[region].pages && count <= regions_[region].pages - first;
  }

  uint8_t* addr(uint32_t region, uint32_t page) const { return regions_[region].m->base + (size_t)page * page_size(); }

  // false: the pages could not be installed (JS was told; the caller leaves them unmarked)
  bool copy_in(uint32_t region, uint32_t p, uint32_t q, const uint8_t* src) { return place(uffd_, (uintptr_t)addr(region, 0), region, p, q - p, src); }
  bool zero_in(uint32_t region, uint32_t p, uint32_t q) { return place(uffd_, (uintptr_t)addr(region, 0), region, p, q - p, nullptr); }

  // Runs of [first, end) by one bitmap's value: fn(p, q, set).
  template <typename Fn>
  static void each_run(const uint32_t* bits, uint32_t first, uint32_t end, Fn fn) {
    auto test = [&](uint32_t p) { return (__atomic_load_n(&bits[p >> 5], __ATOMIC_ACQUIRE) >> (p & 31)) & 1u; };
    for (uint32_t p = first; p < end;) {
      bool v = test(p);
      uint32_t q = p + 1;
      while (q < end && (bool)test(q) == v) q++;
      fn(p, q, v);
      p = q;
    }
  }

  // PAGES: pre-copy overwrites an older round's data in place and installs missing pages; post-copy installs
  // only the missing pages (a page held here is never overwritten: invariant 2), counted as received twice.
  void pages(uint32_t region, uint32_t first, uint32_t count, const uint8_t* data) {
    const size_t ps = page_size();
    const RegionView& rv = regions_[region];
    uint32_t end = first + count;
    auto src = [&](uint32_t p) { return data + (size_t)(p - first) * ps; };
    if (postcopy_) {
      uint32_t twice = 0;
      each_run(rv.bits, first, end, [&](uint32_t p, uint32_t q, bool got) {
        if (got) {
          for (uint32_t k = p; k < q; k++) twice += !((freed_[region][k >> 5] >> (k & 31)) & 1u);
          return;
        }
        if (!copy_in(region, p, q, src(p))) return;
        uint32_t newly = set_range(rv.bits, p, q - p);
        emit({kEvArrived, (double)region, (double)p, (double)(q - p), (double)newly});
      });
      if (twice) emit({kEvTwice, (double)twice, 0, 0, 0});
      return;
    }
    std::shared_lock<PrecopyWrites> writing(g_precopy_writes);
    // a known-zero page whose zero page may still be deferred: all of them in first (a later round's data)
    if (deferred_next_ < deferred_zero_.size()) {
      bool zero = false;
      each_run(zero_[region], first, end, [&](uint32_t, uint32_t, bool z) { zero |= z; });
      if (zero && !install_deferred(SIZE_MAX)) return;
    }
    bool all_in = true;
    each_run(rv.bits, first, end, [&](uint32_t p, uint32_t q, bool got) {
      // held: an older round's copy, or the zero page of a known-zero one (any deferred ones were installed just
      // above): written over in place (a zero page takes an ordinary copy-on-write fault here, not a userfault)
      if (!got) all_in &= copy_in(region, p, q, src(p));
      else if (!lazy_zero_) memcpy(addr(region, p), src(p), (size_t)(q - p) * ps);
      else  // lazy: a known-zero page was never installed (still missing), the others hold an older round's data
        each_run(zero_[region], p, q, [&](uint32_t a, uint32_t b, bool zero) {
          if (zero) all_in &= copy_in(region, a, b, src(a));
          else memcpy(addr(region, a), src(a), (size_t)(b - a) * ps);
        });
    });
    if (!all_in) return;  // JS fails the session; nothing of this frame counts as received
    clear_range(zero_[region], first, count);
    uint32_t newly = set_range(rv.bits, first, count);
    if (newly) emit({kEvReceived, (double)newly, 0, 0, 0});
  }

  // RANGES: u8 kind | u32 region | (u32 first, u32 count)*
  bool ranges(const uint8_t* body, size_t n) {
    if (n < 5 || (n - 5) % 8) return false;
    uint8_t kind = body[0];
    uint32_t region = get_u32(&body[1]);
    const size_t ps = page_size();
    if (region >= regions_.size()) return false;
    if (kind != kRangeZero && kind != kRangeFree && !(kind == kRangeStale && !postcopy_)) return false;
    for (size_t k = 5; k < n; k += 8)
      if (!run_ok(region, get_u32(&body[k]), get_u32(&body[k + 4]))) return false;
    const RegionView& rv = regions_[region];
    std::unique_lock<PrecopyWrites> dropping(g_precopy_writes, std::defer_lock);
    if (!postcopy_) dropping.lock();  // until the drop below is done
    int64_t delta = 0;
    std::vector<iovec> drop;  // dropped together after the loop: one system call for the frame (discard.h)
    std::vector<std::pair<uint32_t, uint32_t>> zero_runs;  // pre-copy: installed after the drop
    for (size_t k = 5; k < n; k += 8) {
      uint32_t first = get_u32(&body[k]), count = get_u32(&body[k + 4]), end = first + count;
      bool any_held = false;
      each_run(rv.bits, first, end, [&](uint32_t, uint32_t, bool got) { any_held |= got; });
      if (kind == kRangeStale) {
        // an out-of-date copy (a hot page): dropped now, it faults and is fetched fresh after the hand-off
        if (any_held) drop.push_back({addr(region, first), (size_t)count * ps});
        delta -= clear_range(rv.bits, first, count);
        clear_range(zero_[region], first, count);
      } else if (!postcopy_) {
        if (any_held) drop.push_back({addr(region, first), (size_t)count * ps});  // held data is zero now
        set_range(zero_[region], first, count);
        delta += set_range(rv.bits, first, count);
        zero_runs.emplace_back(first, count);
      } else {
        uint32_t twice = 0;
        each_run(rv.bits, first, end, [&](uint32_t p, uint32_t q, bool got) {
          if (got) {
            for (uint32_t i = p; i < q; i++) twice += !((freed_[region][i >> 5] >> (i & 31)) & 1u);
            return;
          }
          if (!zero_in(region, p, q)) return;
          set_range(zero_[region], p, q - p);
          uint32_t newly = set_range(rv.bits, p, q - p);
          emit({kEvArrived, (double)region, (double)p, (double)(q - p), (double)newly});
        });
        if (twice) emit({kEvTwice, (double)twice, 0, 0, 0});
      }
    }
    // pre-copy only (the service does not run here yet), so the bits may change before the pages go
    if (!drop.empty()) (void)discard_ranges(drop);
    // Known-zero pages get the zero page before the hand-off: left missing, each would cost the service a
    // blocking fault after it (a round trip to the demand thread; measured: a page-store writing 10k pages/s, 1 in
    // 8 of them zero, stalled its loop 30 ms right after resuming). Not at once: install_deferred() puts them in
    // while the socket has nothing to read and before the next control frame goes to JS, so that round 0 does not
    // wait for them (page-store: one per 7 data pages). A pre-copy-only session (lazy_zero_) leaves them missing:
    // its regions are unregistered once the service runs here, and a missing page then reads as zero.
    if (!lazy_zero_)
      for (auto [zf, zc] : zero_runs) deferred_zero_.push_back({region, zf, zc});
    if (delta) emit({kEvReceived, (double)delta, 0, 0, 0});
    return true;
  }

  // Installs the zero pages of deferred runs still known zero (a later PAGES or STALE frame may have changed
  // some), up to max_runs runs; false when an install failed (JS was told and ends the session).
  bool install_deferred(size_t max_runs) {
    for (; deferred_next_ < deferred_zero_.size() && max_runs > 0; max_runs--) {
      auto [region, first, count] = deferred_zero_[deferred_next_++];
      bool ok = true;
      each_run(zero_[region], first, first + count, [&](uint32_t p, uint32_t q, bool zero) {
        if (zero && ok) ok = zero_in(region, p, q);
      });
      if (!ok) {
        deferred_zero_.clear(), deferred_next_ = 0;
        return false;
      }
    }
    if (deferred_next_ == deferred_zero_.size()) deferred_zero_.clear(), deferred_next_ = 0;
    return true;
  }

  // how: records.h's kEnded, kMalformed, ...
  void link_broke(int err, int how) {
    stats_fd_.store(-1);
    if (fd_ >= 0) close(fd_);
    fd_ = -1;
    emit({kEvClosed, (double)err, (double)how, (double)link_id_, 0});
    flush(true);
  }

  int uffd_;
  std::vector<RegionView> regions_;
  std::vector<uint32_t*> zero_, freed_;  // knownZero and freedHere of placement.ts
  int fd_, kick_fd_ = -1;
  std::vector<uint8_t> head_;  // the constructor's (moved into the buffer)
  bool postcopy_ = false, paused_ = false;
  // Pre-copy only (REGIONS.mode): known-zero pages are not installed before the hand-off (placement.ts, lazyZero).
  const bool lazy_zero_;
  std::unique_ptr<records::Link> link_;  // plain, or sealed: this thread opens the records (an encrypted migration)
  // Otherwise: zero runs (region, first, count) marked known-zero and received, their zero pages not installed yet.
  std::vector<std::array<uint32_t, 3>> deferred_zero_;
  size_t deferred_next_ = 0;
  static constexpr size_t kDeferredRunsPerTurn = 256;  // between two looks at the socket: ~0.3 ms of one-page runs
  std::mutex mu_;
  bool resume_pending_ = false, resume_postcopy_ = false;
  NextLink next_;         // under mu_
  uint32_t link_id_ = 0;  // the connection fd_ is (this thread's)
  std::vector<uint8_t> next_head_;
  // bytes read ahead: frames at [buf_pos_, buf_len_)
  static constexpr size_t kDirectBytes = 64 << 10;     // larger frames are read straight into the staging buffer
  static_assert(kDirectBytes == records::kAlignBytes, "a sealing writer aligns records to the frames read directly");
  // A read while frames are small: as large as the sender's gathered writes (kGatherBytes, 1 MiB), so that one
  // BATCH's frames are one wake-up and one read, not four (with 256 KiB, a guest of 7-page frames, 1 GiB on
  // loopback, 4 alternating runs each: round 0 1283-1413 -> 1357-1611 MiB/s, destination CPU 0.68-0.75 ->
  // 0.59-0.68 s/GiB; 512 KiB and 2 MiB did no better). With the header-only read after a large frame (below), 5
  // alternating pairs against 256 KiB without it: 7-page frames dst 0.730 -> 0.684 s/GiB (medians), 256-page
  // frames 0.559 -> 0.516.
  static constexpr size_t kReadAheadBytes = 1 << 20;
  static constexpr size_t kBufBytes = kReadAheadBytes + kDirectBytes;
  static constexpr size_t kLowatBytes = 1 << 20;  // SO_RCVLOWAT at most: a PAGES frame's pages
  int lowat_ = 1;                                  // the socket's SO_RCVLOWAT as last set
  uint64_t promise_end_ = 0;                       // bytes_read_ once the last BATCH's bytes are all read (0: none)
  bool batch_wait_ = false;                        // the low-water mark waits on a BATCH's promise
  static constexpr int kBatchWaitMs = 10;          // 1 MiB at ~1 Gbit/s
  std::vector<uint8_t> buf_;
  size_t buf_pos_ = 0, buf_len_ = 0;
  // a large frame being read straight into staging_ (PAGES) or body_ (others)
  bool direct_ = false;
  bool last_large_ = false;  // the last frame was read straight into staging (or body_)
  uint8_t hdr_[17];
  size_t hdr_have_ = 0, hdr_need_ = 5, body_have_ = 0, body_need_ = 0;
  uint32_t len_ = 0;
  uint8_t type_ = 0;
  std::vector<uint8_t> body_;
  uint8_t* staging_ = nullptr;

 public:
  std::atomic<uint64_t> bytes_read_{0};  // from the socket, all connections (sealed: the plaintext opened)
  std::atomic<uint64_t> sealed_read_{0};  // sealed: the ciphertext read from the socket
  std::atomic<int> stats_fd_{-1};          // fd_, for progress() on the JS thread

  // The watchdog's progress: bytes read, and bytes waiting in the socket (a low-water mark holds a frame's
  // bytes there until the whole frame is in). Not exact while the thread reads (two loads, not one), nor if the
  // descriptor was closed and its number reused in between: the watchdog only asks whether it changed. Sealed,
  // it counts both the ciphertext read and the plaintext opened (a record's bytes count as they arrive).
  uint64_t progress() const {
    int queued = 0, fd = stats_fd_.load();
    if (fd < 0 || ioctl(fd, FIONREAD, &queued) < 0) queued = 0;
    return bytes_read_.load() + sealed_read_.load() + (uint64_t)queued;
  }
};

// new BulkReader(uffdFd, regionIds, received, knownZero, freedHere, socketFd, head, onEvents(events, frames), lazyZero = false,
//               seal?); resume(postcopy); attach(fd | -1, head, seal?); close() -> events left.
//   seal: { recv, cipherHead } (an encrypted migration): the thread opens the records itself (native/records.h).
class BulkReader : public ThreadWrap<BulkReader> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "BulkReader", {
        InstanceMethod("resume", &BulkReader::Resume),
        InstanceMethod("attach", &BulkReader::Attach),
        InstanceMethod("close", &BulkReader::Close),
        InstanceAccessor("cpuMs", &BulkReader::CpuMs, nullptr),
        InstanceAccessor("bytesRead", &BulkReader::BytesRead, nullptr),
    });
  }
  explicit BulkReader(const Napi::CallbackInfo& info) : ThreadWrap<BulkReader>(info) {
    auto env = info.Env();
    if (info.Length() < 8 || !info[0].IsNumber() || !info[7].IsFunction())
      throw Napi::TypeError::New(env, "expected (uffdFd, regionIds, received, knownZero, freedHere, fd, head, onEvents)");
    auto views = region_views(info, 1, &keep_);
    auto zero = bitmap_words(info, 3, views, &keep_);
    auto freed = bitmap_words(info, 4, views, &keep_);
    auto head = bytes_arg(info, 6);
    bool lazy_zero = arg_bool(info, 8, "lazyZero", false);
    auto link = records::link_arg(info, 9);
    int fd = dup_socket(env, info[5]);
    thread_ = std::make_unique<BulkReaderThread>(env, info[7].As<Napi::Function>(), info[0].As<Napi::Number>().Int32Value(),
                                                 std::move(views), std::move(zero), std::move(freed), fd, std::move(head),
                                                 lazy_zero, std::move(link));
  }

 private:
  BulkReaderThread* reader() { return static_cast<BulkReaderThread*>(thread_.get()); }
  Napi::Value BytesRead(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), thread_ ? (double)reader()->progress() : 0); }
  Napi::Value Resume(const Napi::CallbackInfo& info) {
    if (thread_) reader()->resume(arg_bool(info, 0, "postcopy", true));
    return info.Env().Undefined();
  }
  Napi::Value Attach(const Napi::CallbackInfo& info) {
    auto env = info.Env();
    if (!thread_) throw lib_error(env, "ERR_UFFD_CLOSED", "this bulk reader is closed");
    int fd = -1;
    auto link = records::link_arg(info, 2);
    if (info.Length() > 0 && info[0].IsNumber() && info[0].As<Napi::Number>().Int32Value() >= 0) fd = dup_socket(env, info[0]);
    return Napi::Number::New(env, reader()->attach(fd, bytes_arg(info, 1), std::move(link)));
  }
};

}  // namespace

void init_bulk_bindings(Napi::Env env, Napi::Object exports) { exports.Set("BulkReader", BulkReader::Define(env)); }

}  // namespace uffdm
