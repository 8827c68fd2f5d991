// Encrypted migrations at the native threads' speed: a sealed connection's
// bulk bytes pass through this thread, between the TCP socket and one end of
// a socketpair whose other end the bulk thread (the destination's reader, the
// source's writer) uses as its connection, unchanged. One direction each:
//  - 'open' (destination): sealed records from the TCP socket -> their
//    plaintext into the socketpair, once each record's tag held;
//  - 'seal' (source): plaintext from the socketpair -> records onto the socket.
// The record format and the key schedule are src/protocol/records.ts's (JS
// seals and opens the same connection until it hands a direction over here,
// with its key, IV, sequence number and bytes under the key). AES-256-GCM
// through OpenSSL's EVP, the library Node itself links and exports.
//
// Ends: the socket's end of stream becomes the socketpair's (shutdown), so the
// reader reads every frame before it; a socket error or a record that fails
// is an event for JS (CLOSED: errno, kind), which fails the connection. The
// plaintext end of the pair reaching its end (the writer closed) ends it quietly.
#include <errno.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "bindings.h"
#include "demand.h"
#include "errors.h"
#include "page_maps.h"

namespace uffdm {

namespace {

constexpr uint8_t kSealed = 0xe0;
constexpr size_t kHeader = 5, kTag = 16, kMaxPlain = 256 << 10;  // records.ts: SEALED, TAG_BYTES, MAX_RECORD_PLAINTEXT
constexpr size_t kRecordMax = kHeader + kMaxPlain + kTag;
// What the socketpair holds each way. Measured: 4 MiB let the last pre-copy round's tail queue there, ahead of the
// hand-off on a slow link (1 Gbit/s: downtime 11.5-18.2 ms against 5.8-7.8 plaintext; 256 KiB: 6.4-10.3), for a
// bulk rate within noise of this one's (dense 1 GiB round 0, medians: 1040 against 939-996 MiB/s; 1 MiB: 991, downtime 9.9-13.2).
constexpr int kPairBufferBytes = 256 << 10;

enum : int {
  kEvClosed = 7,  // (errno, kind)
};
// CLOSED's kind, as src/agent/seal-relay.ts reads it
enum : int { kEnded = 0, kNotARecord = 1, kTagFailed = 2 };

// One direction's key and nonces, kept in step with records.ts's Direction.
struct Direction {
  uint8_t key[32], iv[12];
  uint64_t seq = 0;
  uint64_t under_key = 0, rekey_bytes = 0;

  void nonce(uint8_t out[12]) {
    memcpy(out, iv, 12);
    for (int i = 0; i < 8; i++) out[4 + i] ^= (uint8_t)(seq >> (56 - 8 * i));
    seq++;
  }
  // HKDF-SHA256(ikm = key, salt = "", info = "uffd-migrate/rekey", 32): an empty HMAC key is HashLen zeros (RFC 5869).
  void count(size_t bytes) {
    under_key += bytes;
    if (under_key < rekey_bytes) return;
    uint8_t prk[32], okm[32];
    unsigned len = 0;
    static const uint8_t zero = 0;
    HMAC(EVP_sha256(), &zero, 0, key, 32, prk, &len);
    static const char info[] = "uffd-migrate/rekey";
    uint8_t msg[sizeof info];  // info || 0x01
    memcpy(msg, info, sizeof info - 1);
    msg[sizeof info - 1] = 1;
    HMAC(EVP_sha256(), prk, 32, msg, sizeof msg, okm, &len);
    memcpy(key, okm, 32);
    under_key = 0;
  }
};

class SealRelayThread : public DemandThread {
 public:
  SealRelayThread(Napi::Env env, Napi::Function cb, bool seal, int tcp, int pair, const Direction& dir, std::vector<uint8_t> head, bool urgent)
      : DemandThread(env, cb, "uffd-migrate:seal-relay", seal ? "uffdm-seal-tx" : "uffdm-seal-rx"), seal_(seal), tcp_(tcp),
        pair_(pair), dir_(dir), in_(std::move(head)) {
    ctx_ = EVP_CIPHER_CTX_new();
    if (!ctx_) throw Napi::Error::New(env, "EVP_CIPHER_CTX_new failed");
    urgent_ = urgent;  // the demand connection's: at the service's nice, like its thread; bulk work at agentNice
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
      uint8_t nonce[12];
      dir_.nonce(nonce);
      uint8_t* rec = out_.data();
      put_u32(rec, (uint32_t)(1 + n + kTag));
      rec[4] = kSealed;
      int len = 0;
      bool ok = EVP_EncryptInit_ex(ctx_, EVP_aes_256_gcm(), nullptr, dir_.key, nonce) == 1 &&
                EVP_EncryptUpdate(ctx_, nullptr, &len, rec, kHeader) == 1 &&
                EVP_EncryptUpdate(ctx_, rec + kHeader, &len, p + *off, (int)n) == 1 &&
                EVP_EncryptFinal_ex(ctx_, rec + kHeader + n, &len) == 1 &&
                EVP_CIPHER_CTX_ctrl(ctx_, EVP_CTRL_GCM_GET_TAG, kTag, rec + kHeader + n) == 1;
      if (!ok) return failed(EIO, kEnded), false;
      dir_.count(n);
      iovec iov{rec, kHeader + n + kTag};
      int err = 0;
      if (!write_all(tcp_, stop_fd_, &iov, 1, &err)) return err != ECANCELED && (failed(err, kEnded), true), false;
      *off += n;
    }
    return true;
  }

  // Every whole record: its tag checked, then its plaintext into the pair; a partial one waits for its rest.
  bool open_all(uint8_t* p, size_t have, size_t* off) {
    while (have - *off >= kHeader) {
      uint8_t* rec = p + *off;
      uint32_t len = get_u32(rec);
      if (rec[4] != kSealed || len < 1 + kTag + 1 || len > 1 + kMaxPlain + kTag) return failed(EPROTO, kNotARecord), false;
      if (have - *off < 4 + (size_t)len) break;
      size_t n = len - 1 - kTag;
      uint8_t nonce[12];
      dir_.nonce(nonce);
      int outl = 0;
      bool ok = EVP_DecryptInit_ex(ctx_, EVP_aes_256_gcm(), nullptr, dir_.key, nonce) == 1 &&
                EVP_DecryptUpdate(ctx_, nullptr, &outl, rec, kHeader) == 1 &&
                EVP_DecryptUpdate(ctx_, out_.data(), &outl, rec + kHeader, (int)n) == 1 &&
                EVP_CIPHER_CTX_ctrl(ctx_, EVP_CTRL_GCM_SET_TAG, kTag, rec + kHeader + n) == 1 &&
                EVP_DecryptFinal_ex(ctx_, out_.data() + n, &outl) == 1;
      if (!ok) return failed(EBADMSG, kTagFailed), false;  // nothing of it leaves this thread
      dir_.count(n);
      iovec iov{out_.data(), n};
      int err = 0;
      // the reader closed its end (the connection is being torn down): nothing to tell
      if (!write_all(pair_, stop_fd_, &iov, 1, &err)) return false;
      *off += 4 + len;
    }
    return true;
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

// new SealRelay(mode: 'seal' | 'open', socketFd, key, iv, seq, bytesUnderKey, rekeyBytes, head, onEvents, pairFd?, urgent?)
//   pairFd: use (a dup of) this end of another relay's socketpair (its outerFd) instead of a pair of its own: the two
//   directions of one connection (the demand connection) on two threads, so that neither direction's writes can
//   hold up the other's. urgent: a blocked service thread waits on it (the demand connection): it runs at the
//   service's nice value, as the demand threads do.
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
        InstanceAccessor("outerFd", &SealRelay::OuterFd, nullptr),
        InstanceAccessor("cpuMs", &SealRelay::CpuMs, nullptr),
        InstanceAccessor("bytesIn", &SealRelay::BytesIn, nullptr),
    });
  }
  explicit SealRelay(const Napi::CallbackInfo& info) : ThreadWrap<SealRelay>(info) {
    auto env = info.Env();
    if (info.Length() < 9 || !info[0].IsString() || !info[2].IsTypedArray() || !info[3].IsTypedArray() || !info[4].IsNumber() ||
        !info[5].IsNumber() || !info[6].IsNumber() || !info[8].IsFunction()) {
      throw Napi::TypeError::New(env, "expected (mode, fd, key, iv, seq, bytesUnderKey, rekeyBytes, head, onEvents)");
    }
    std::string mode = info[0].As<Napi::String>();
    if (mode != "seal" && mode != "open") throw Napi::TypeError::New(env, "expected mode 'seal' or 'open'");
    auto key = info[2].As<Napi::Uint8Array>(), iv = info[3].As<Napi::Uint8Array>();
    if (key.ByteLength() != 32 || iv.ByteLength() != 12) throw Napi::TypeError::New(env, "expected a 32-byte key and a 12-byte IV");
    Direction dir;
    memcpy(dir.key, key.Data(), 32), memcpy(dir.iv, iv.Data(), 12);
    dir.seq = (uint64_t)info[4].As<Napi::Number>().DoubleValue();
    dir.under_key = (uint64_t)info[5].As<Napi::Number>().DoubleValue();
    dir.rekey_bytes = (uint64_t)info[6].As<Napi::Number>().DoubleValue();
    int sv[2] = {-1, -1};
    if (info.Length() > 9 && info[9].IsNumber()) {
      sv[0] = dup_socket(env, info[9]);
    } else if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) != 0) {
      throw sys_error(env, -errno, "socketpair");
    }
    for (int fd : sv) {
      if (fd < 0) continue;
      int b = kPairBufferBytes;
      // (as large as the process may have; the kernel's default still works, in smaller steps)
      if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &b, sizeof b)) (void)setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &b, sizeof b);
      if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &b, sizeof b)) (void)setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &b, sizeof b);
    }
    int tcp;
    try {
      tcp = dup_socket(env, info[1]);
    } catch (...) {
      close(sv[0]);
      if (sv[1] >= 0) close(sv[1]);
      throw;
    }
    inner_ = sv[1];
    outer_ = sv[0];
    bool urgent = info.Length() > 10 && info[10].IsBoolean() && info[10].As<Napi::Boolean>().Value();
    auto* t = new SealRelayThread(env, info[8].As<Napi::Function>(), mode == "seal", tcp, sv[0], dir, bytes_arg(info, 7), urgent);
    relay_ = t;
    thread_.reset(t);
  }
  ~SealRelay() override {
    if (inner_ >= 0) close(inner_);
  }

 private:
  Napi::Value InnerFd(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), inner_); }
  // The thread's own end of the pair (for the relay of the other direction, which dup()s it); -1 once closed.
  Napi::Value OuterFd(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), thread_ ? outer_ : -1); }
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
  int inner_ = -1, outer_ = -1;
  SealRelayThread* relay_ = nullptr;
};

}  // namespace

void init_seal_relay_bindings(Napi::Env env, Napi::Object exports) { exports.Set("SealRelay", SealRelay::Define(env)); }

}  // namespace uffdm
