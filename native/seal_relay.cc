// Encrypted migrations at the native threads' speed: a sealed connection's
// bulk bytes pass through this thread, between the TCP socket and one end of
// a socketpair whose other end the bulk thread (the destination's reader, the
// source's writer) uses as its connection, unchanged. One direction each:
//  - 'open' (destination): sealed records from the TCP socket -> their
//    plaintext into the socketpair, once each record's tag held;
//  - 'seal' (source): plaintext from the socketpair -> records onto the socket.
// The record format and the key schedule are src/protocol/records.ts's (JS
// seals and opens the same connection until it hands a direction over here,
// with its key, IV, sequence number and bytes under the key; records.h). The
// demand connection has no relay: its threads seal and open it themselves, a
// fault's round trip is too short to cross two more threads each way.
//
// Ends: the socket's end of stream becomes the socketpair's (shutdown), so the
// reader reads every frame before it; a socket error or a record that fails
// is an event for JS (CLOSED: errno, kind), which fails the connection. The
// plaintext end of the pair reaching its end (the writer closed) ends it quietly.
#include <errno.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "bindings.h"
#include "demand.h"
#include "errors.h"
#include "page_maps.h"
#include "records.h"

namespace uffdm {

namespace {

using namespace records;

// What the socketpair holds each way. Measured: 4 MiB let the last pre-copy round's tail queue there, ahead of the
// hand-off on a slow link (1 Gbit/s: downtime 11.5-18.2 ms against 5.8-7.8 plaintext; 256 KiB: 6.4-10.3), for a
// bulk rate within noise of this one's (dense 1 GiB round 0, medians: 1040 against 939-996 MiB/s; 1 MiB: 991, downtime 9.9-13.2).
constexpr int kPairBufferBytes = 256 << 10;

enum : int {
  kEvClosed = 7,  // (errno, how: records.h's kEnded, kNotARecord, kTagFailed)
};

class SealRelayThread : public DemandThread {
 public:
  SealRelayThread(Napi::Env env, Napi::Function cb, bool seal, int tcp, int pair, const Direction& dir, std::vector<uint8_t> head)
      : DemandThread(env, cb, "uffd-migrate:seal-relay", seal ? "uffdm-seal-tx" : "uffdm-seal-rx"), seal_(seal), tcp_(tcp),
        pair_(pair), dir_(dir), in_(std::move(head)) {
    ctx_ = EVP_CIPHER_CTX_new();
    if (!ctx_) throw Napi::Error::New(env, "EVP_CIPHER_CTX_new failed");
    urgent_ = false;  // bulk work: at the agent's nice value (agentNice)
    start();
  }
  ~SealRelayThread() override {
    stop();
    close(tcp_);
    close(pair_);
    EVP_CIPHER_CTX_free(ctx_);
  }

  std::atomic<uint64_t> bytes_in_{0};

 private:
  void run() override {
    size_t have = in_.size(), begin = 0;  // unhandled bytes: [begin, have)
    in_.resize(std::max<size_t>(2 * kRecordMax, have));
    out_.resize(kRecordMax);
    const int from = seal_ ? pair_ : tcp_;
    for (bool first = true;; first = false) {
      // a record begun stays where it is until the buffer cannot take a whole one after it (one move per record at most)
      if (in_.size() - have < kRecordMax && begin > 0) {
        memmove(in_.data(), in_.data() + begin, have - begin);
        have -= begin;
        begin = 0;
      }
      if (!(first && have > 0)) {
        if (!wait_fd(from, POLLIN, stop_fd_, flush_timeout_ms(-1))) return;
        ssize_t n = read(from, in_.data() + have, in_.size() - have);
        if (n == 0) return ended(0);
        if (n < 0) {
          if (errno == EAGAIN || errno == EINTR) {
            flush();
            continue;
          }
          return ended(errno);
        }
        have += (size_t)n;
        bytes_in_.fetch_add((uint64_t)n, std::memory_order_relaxed);
      }
      bool ok = seal_ ? seal_all(in_.data(), have, &begin) : open_all(in_.data(), have, &begin);
      if (!ok) return;
      if (begin == have) begin = have = 0;
    }
  }

  // Everything read goes out as records at once (a control frame must not wait for more bytes).
  bool seal_all(const uint8_t* p, size_t have, size_t* off) {
    while (*off < have) {
      size_t n = std::min(have - *off, kMaxPlain);
      iovec plain{(void*)(p + *off), n};
      size_t len = seal(ctx_, dir_, &plain, 1, n, out_.data());
      if (len == 0) return failed(EIO, kEnded), false;
      iovec iov{out_.data(), len};
      int err = 0;
      if (!write_all(tcp_, stop_fd_, &iov, 1, &err)) return err != ECANCELED && (failed(err, kEnded), true), false;
      *off += n;
    }
    return true;
  }

  // Every whole record: its tag checked, then its plaintext into the pair; a partial one waits for its rest.
  bool open_all(uint8_t* p, size_t have, size_t* off) {
    for (;;) {
      long len = record_length(p + *off, have - *off);
      if (len < 0) return failed(EPROTO, kNotARecord), false;
      if (len == 0) return true;
      long n = open(ctx_, dir_, p + *off, (size_t)len, out_.data());
      if (n < 0) return failed(EBADMSG, kTagFailed), false;  // nothing of it leaves this thread
      iovec iov{out_.data(), (size_t)n};
      int err = 0;
      // the reader closed its end (the connection is being torn down): nothing to tell
      if (!write_all(pair_, stop_fd_, &iov, 1, &err)) return false;
      *off += (size_t)len;
    }
  }

  // The side this thread reads ended: the socket's end of stream reaches the reader through the pair after every
  // frame before it; an error is JS's to report. The plaintext end ending (the writer closed) needs no word.
  void ended(int err) {
    if (!seal_ && err == 0) return (void)shutdown(pair_, SHUT_WR);
    if (!seal_) failed(err, kEnded);
  }

  void failed(int err, int kind) {
    emit({kEvClosed, (double)err, (double)kind, 0, 0});
    flush(true);
  }

  bool seal_;
  int tcp_, pair_;
  Direction dir_;
  std::vector<uint8_t> in_, out_;
  EVP_CIPHER_CTX* ctx_ = nullptr;
};

// new SealRelay(mode: 'seal' | 'open', socketFd, state: SealState, head, onEvents)
//   innerFd: the socketpair's end the bulk thread takes (it dup()s it); releaseInner() once it did (takeInner(): the
//   caller owns it instead).
//   close() -> events left; cpuMs; bytesIn (read from its input so far).
class SealRelay : public ThreadWrap<SealRelay> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "SealRelay", {
        InstanceMethod("close", &SealRelay::Close),
        InstanceMethod("releaseInner", &SealRelay::ReleaseInner),
        InstanceMethod("takeInner", &SealRelay::TakeInner),
        InstanceAccessor("innerFd", &SealRelay::InnerFd, nullptr),
        InstanceAccessor("cpuMs", &SealRelay::CpuMs, nullptr),
        InstanceAccessor("bytesIn", &SealRelay::BytesIn, nullptr),
    });
  }
  explicit SealRelay(const Napi::CallbackInfo& info) : ThreadWrap<SealRelay>(info) {
    auto env = info.Env();
    if (info.Length() < 5 || !info[0].IsString() || !info[4].IsFunction()) throw Napi::TypeError::New(env, "expected (mode, fd, state, head, onEvents)");
    std::string mode = info[0].As<Napi::String>();
    if (mode != "seal" && mode != "open") throw Napi::TypeError::New(env, "expected mode 'seal' or 'open'");
    Direction dir = direction_arg(env, info[2]);
    int sv[2] = {-1, -1};
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) != 0) throw sys_error(env, -errno, "socketpair");
    for (int fd : sv) {
      int b = kPairBufferBytes;
      // (as large as the process may have; the kernel's default still works, in smaller steps)
      if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &b, sizeof b)) (void)setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &b, sizeof b);
      if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &b, sizeof b)) (void)setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &b, sizeof b);
    }
    int tcp;
    try {
      tcp = dup_socket(env, info[1]);
    } catch (...) {
      close(sv[0]), close(sv[1]);
      throw;
    }
    inner_ = sv[1];
    auto* t = new SealRelayThread(env, info[4].As<Napi::Function>(), mode == "seal", tcp, sv[0], dir, bytes_arg(info, 3));
    relay_ = t;
    thread_.reset(t);
  }
  ~SealRelay() override {
    if (inner_ >= 0) close(inner_);
  }

 private:
  Napi::Value InnerFd(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), inner_); }
  Napi::Value ReleaseInner(const Napi::CallbackInfo& info) {
    if (inner_ >= 0) close(inner_);
    inner_ = -1;
    return info.Env().Undefined();
  }
  // The caller owns innerFd from now on (a test reads it through a net.Socket).
  Napi::Value TakeInner(const Napi::CallbackInfo& info) {
    int fd = inner_;
    inner_ = -1;
    return Napi::Number::New(info.Env(), fd);
  }
  Napi::Value BytesIn(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), thread_ ? (double)relay_->bytes_in_.load() : 0);
  }
  int inner_ = -1;
  SealRelayThread* relay_ = nullptr;
};

}  // namespace

void init_seal_relay_bindings(Napi::Env env, Napi::Object exports) { exports.Set("SealRelay", SealRelay::Define(env)); }

}  // namespace uffdm
