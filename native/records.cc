// The sealed record layer in C++ (records.h).
#include "records.h"

#include <errno.h>
#include <openssl/hmac.h>
#include <string.h>
#include <unistd.h>

#include <algorithm>

#include "demand.h"

namespace uffdm {
namespace records {

void Direction::nonce(uint8_t out[12]) {
  memcpy(out, iv, 12);
  for (int i = 0; i < 8; i++) out[4 + i] ^= (uint8_t)(seq >> (56 - 8 * i));
  seq++;
}

// HKDF-SHA256(ikm = key, salt = "", info = "uffd-migrate/rekey", 32): an empty HMAC key is HashLen zeros (RFC 5869).
void Direction::count(size_t bytes) {
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

size_t seal(EVP_CIPHER_CTX* ctx, Direction& dir, const iovec* iov, int iovcnt, size_t n, uint8_t* rec) {
  uint8_t nonce[12];
  dir.nonce(nonce);
  put_u32(rec, (uint32_t)(1 + n + kTag));
  rec[4] = kSealed;
  int len = 0;
  if (EVP_EncryptInit_ex(ctx, EVP_aes_256_gcm(), nullptr, dir.key, nonce) != 1 || EVP_EncryptUpdate(ctx, nullptr, &len, rec, kHeader) != 1)
    return 0;
  size_t done = 0;
  for (int i = 0; i < iovcnt && done < n; i++) {
    size_t k = std::min(iov[i].iov_len, n - done);
    if (EVP_EncryptUpdate(ctx, rec + kHeader + done, &len, (const uint8_t*)iov[i].iov_base, (int)k) != 1) return 0;
    done += k;
  }
  if (done != n || EVP_EncryptFinal_ex(ctx, rec + kHeader + n, &len) != 1 ||
      EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, kTag, rec + kHeader + n) != 1)
    return 0;
  dir.count(n);
  return kHeader + n + kTag;
}

long record_length(const uint8_t* p, size_t have) {
  if (have < kHeader) return 0;
  uint32_t len = get_u32(p);
  if (p[4] != kSealed || len < 1 + kTag + 1 || len > 1 + kMaxPlain + kTag) return -1;
  return have < 4 + (size_t)len ? 0 : 4 + (long)len;
}

long open(EVP_CIPHER_CTX* ctx, Direction& dir, const uint8_t* rec, size_t len, uint8_t* out) {
  size_t n = len - kHeader - kTag;
  uint8_t nonce[12];
  dir.nonce(nonce);
  int outl = 0;
  bool ok = EVP_DecryptInit_ex(ctx, EVP_aes_256_gcm(), nullptr, dir.key, nonce) == 1 &&
            EVP_DecryptUpdate(ctx, nullptr, &outl, rec, kHeader) == 1 &&
            EVP_DecryptUpdate(ctx, out, &outl, rec + kHeader, (int)n) == 1 &&
            EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, kTag, (void*)(rec + kHeader + n)) == 1 &&
            EVP_DecryptFinal_ex(ctx, out + n, &outl) == 1;
  if (!ok) return -1;
  dir.count(n);
  return (long)n;
}

// ---- Link ---------------------------------------------------------------------------

Link::~Link() {
  if (ctx_) EVP_CIPHER_CTX_free(ctx_);
}

bool Link::seal(const Direction* send, const Direction* recv, std::vector<uint8_t> cipher_head) {
  ctx_ = EVP_CIPHER_CTX_new();
  if (!ctx_) return false;
  if ((seal_send_ = send != nullptr)) send_ = *send;
  if ((open_recv_ = recv != nullptr)) {
    recv_ = *recv;
    in_end_ = cipher_head.size();
    in_ = std::move(cipher_head);
    in_.resize(std::max(2 * kRecordMax, in_end_));
    plain_.resize(2 * kMaxPlain);
  }
  return true;
}

bool Link::pending() const {
  return plain_begin_ < plain_end_ || end_ != kEnded || (open_recv_ && record_length(in_.data() + in_begin_, in_end_ - in_begin_) != 0);
}

bool Link::write_all(int fd, int stop_fd, iovec* iov, int iovcnt, int* err) {
  if (!seal_send_) return uffdm::write_all(fd, stop_fd, iov, iovcnt, err);
  size_t total = 0;
  for (int i = 0; i < iovcnt; i++) total += iov[i].iov_len;
  // every record of this write, then one write: a reply of 64 pages and its header is two records
  rec_.resize(total + ((size_t)iovcnt + total / kMaxPlain + 1) * (kHeader + kTag));
  size_t at = 0;
  for (int i = 0; i < iovcnt;) {
    if (iov[i].iov_len >= kAlignBytes) {
      // a frame's pages: records of their own, the last one ending where they end, so that a reader that read the
      // frame's header opens each straight into the place the pages go (no record holds a header and pages)
      for (size_t off = 0; off < iov[i].iov_len;) {
        size_t n = std::min(iov[i].iov_len - off, kMaxPlain);
        iovec part{(uint8_t*)iov[i].iov_base + off, n};
        size_t len = records::seal(ctx_, send_, &part, 1, n, rec_.data() + at);
        if (len == 0) return *err = EIO, false;
        at += len, off += n;
      }
      i++;
      continue;
    }
    // small parts (headers, a few pages) together, up to a record's limit
    int j = i;
    size_t n = 0;
    while (j < iovcnt && iov[j].iov_len < kAlignBytes && n + iov[j].iov_len <= kMaxPlain) n += iov[j++].iov_len;
    if (n > 0) {
      size_t len = records::seal(ctx_, send_, iov + i, j - i, n, rec_.data() + at);
      if (len == 0) return *err = EIO, false;
      at += len;
    }
    i = j;
  }
  iovec out{rec_.data(), at};
  bool ok = uffdm::write_all(fd, stop_fd, &out, 1, err);
  // a write larger than the writer's gathers (a HANDOFF with its discard lists: megabytes) does not keep its buffer
  if (rec_.capacity() > (4u << 20)) std::vector<uint8_t>().swap(rec_);
  return ok;
}

int Link::fill(int fd, uint8_t* direct, size_t room, size_t* opened_direct) {
  plain_begin_ = plain_end_ = 0;
  if (end_ != kEnded) return -EBADMSG;
  // a record that fails ends the stream after the good ones before it (as a relay passes those on first)
  auto failed = [&](int how) {
    end_ = how;
    return plain_end_ > 0 || (opened_direct && *opened_direct > 0) ? 1 : -EBADMSG;
  };
  for (;;) {
    for (;;) {
      long len = record_length(in_.data() + in_begin_, in_end_ - in_begin_);
      if (len < 0) return failed(kNotARecord);
      if (len == 0) break;
      const size_t n = (size_t)len - kHeader - kTag;
      uint8_t* to;
      if (direct && plain_end_ == 0 && n <= room - *opened_direct) {
        to = direct + *opened_direct;  // the caller's buffer: no copy through plain_
      } else if (direct && (*opened_direct > 0 || plain_end_ > 0)) {
        break;  // the caller has plaintext: the next record waits for the next read, which may open it where it goes
      } else if (plain_.size() - plain_end_ >= n) {
        to = plain_.data() + plain_end_;
      } else {
        break;
      }
      long got = records::open(ctx_, recv_, in_.data() + in_begin_, (size_t)len, to);
      if (got < 0) return failed(kTagFailed);  // nothing of it is used
      if (to == plain_.data() + plain_end_) plain_end_ += n;
      else *opened_direct += n;
      in_begin_ += (size_t)len;
    }
    if (in_begin_ == in_end_) in_begin_ = in_end_ = 0;
    if (plain_end_ > 0 || (opened_direct && *opened_direct > 0)) return 1;
    if (in_begin_ > 0) {  // a record begun: to the front, so that the buffer takes all of it
      memmove(in_.data(), in_.data() + in_begin_, in_end_ - in_begin_);
      in_end_ -= in_begin_, in_begin_ = 0;
    }
    size_t asked = in_.size() - in_end_;
    ssize_t r = ::read(fd, in_.data() + in_end_, asked);
    if (r == 0) return -EPIPE;
    if (r < 0) {
      if (errno == EINTR) continue;
      drained_ = errno == EAGAIN;
      return errno == EAGAIN ? 0 : -errno;
    }
    in_end_ += (size_t)r;
    drained_ = (size_t)r < asked;
    if (sealed_counter_) *sealed_counter_ += (uint64_t)r;
  }
}

size_t Link::take(uint8_t* dst, size_t n) {
  size_t k = std::min(n, plain_end_ - plain_begin_);
  memcpy(dst, plain_.data() + plain_begin_, k);
  plain_begin_ += k;
  return k;
}

ssize_t Link::read(int fd, uint8_t* dst, size_t n) {
  if (!open_recv_) return ::read(fd, dst, n);
  size_t direct = 0;
  if (plain_begin_ == plain_end_) {
    int r = fill(fd, dst, n, &direct);
    if (r == -EPIPE) return 0;
    if (r <= 0) return errno = r == 0 ? EAGAIN : -r, -1;
  }
  return (ssize_t)(direct + take(dst + direct, n - direct));
}

int Link::read_parts(int fd, const ReadPart* parts, int n, uint8_t* extra, size_t* extra_have, size_t extra_need,
                     std::atomic<uint64_t>* counter) {
  if (!open_recv_) return uffdm::read_parts(fd, parts, n, extra, extra_have, extra_need, counter);
  for (;;) {
    bool complete = true;
    for (int i = 0; i < n && complete; i++) {
      size_t k = take(parts[i].dst + *parts[i].have, parts[i].need - *parts[i].have);
      *parts[i].have += k;
      if (counter) *counter += k;
      complete = *parts[i].have == parts[i].need;
    }
    if (complete) {
      if (extra && *extra_have < extra_need) {
        size_t k = take(extra + *extra_have, extra_need - *extra_have);
        *extra_have += k;
        if (counter) *counter += k;
      }
      // drained: nothing left here and the socket had no more: the caller polls before reading again
      return drained_ && !pending() ? 2 : 1;
    }
    // the parts' first one not complete: whole records that fit in its rest are opened straight into it
    const ReadPart* part = parts;
    while (*part->have == part->need) part++;
    size_t direct = 0;
    int r = fill(fd, part->dst + *part->have, part->need - *part->have, &direct);
    *part->have += direct;
    if (counter) *counter += direct;
    if (r <= 0) return r;
  }
}

size_t Link::socket_bytes_for(size_t plain) const {
  if (!open_recv_) return plain;
  size_t have = in_end_ - in_begin_;
  if (have < kHeader) return plain > have ? plain - have : 1;  // (at least the plaintext's bytes, less what is here)
  size_t len = 4 + (size_t)get_u32(in_.data() + in_begin_), rest = len > have ? len - have : 0;
  size_t inside = len - kHeader - kTag;  // the record's plaintext
  return std::max<size_t>(1, rest + (plain > inside ? plain - inside : 0));
}

// ---- from JS ---------------------------------------------------------------------------

Direction direction_arg(Napi::Env env, const Napi::Value& v) {
  if (!v.IsObject()) throw Napi::TypeError::New(env, "expected a seal state { key, iv, seq, bytesUnderKey, rekeyBytes }");
  auto o = v.As<Napi::Object>();
  auto key = o.Get("key"), iv = o.Get("iv");
  if (!key.IsTypedArray() || !iv.IsTypedArray() || key.As<Napi::Uint8Array>().ByteLength() != 32 || iv.As<Napi::Uint8Array>().ByteLength() != 12)
    throw Napi::TypeError::New(env, "expected a 32-byte key and a 12-byte IV");
  for (const char* f : {"seq", "bytesUnderKey", "rekeyBytes"})
    if (!o.Get(f).IsNumber()) throw Napi::TypeError::New(env, std::string("expected the seal state's ") + f + " to be a number");
  Direction d;
  memcpy(d.key, key.As<Napi::Uint8Array>().Data(), 32), memcpy(d.iv, iv.As<Napi::Uint8Array>().Data(), 12);
  d.seq = (uint64_t)o.Get("seq").As<Napi::Number>().DoubleValue();
  d.under_key = (uint64_t)o.Get("bytesUnderKey").As<Napi::Number>().DoubleValue();
  d.rekey_bytes = (uint64_t)o.Get("rekeyBytes").As<Napi::Number>().DoubleValue();
  return d;
}

std::unique_ptr<Link> link_arg(Napi::Env env, const Napi::Value& v) {
  auto link = std::make_unique<Link>();
  if (v.IsUndefined() || v.IsNull()) return link;
  if (!v.IsObject()) throw Napi::TypeError::New(env, "expected the connection's seal { send?, recv?, cipherHead? }");
  auto o = v.As<Napi::Object>();
  std::vector<uint8_t> head;
  auto h = o.Get("cipherHead");
  if (h.IsTypedArray()) {
    auto a = h.As<Napi::Uint8Array>();
    head.assign(a.Data(), a.Data() + a.ByteLength());
  }
  auto sv = o.Get("send"), rv = o.Get("recv");
  Direction send, recv;
  bool s = !sv.IsUndefined(), r = !rv.IsUndefined();
  if (s) send = direction_arg(env, sv);
  if (r) recv = direction_arg(env, rv);
  if (!s && !r) return link;
  if (!link->seal(s ? &send : nullptr, r ? &recv : nullptr, std::move(head))) throw Napi::Error::New(env, "EVP_CIPHER_CTX_new failed");
  return link;
}

}  // namespace records
}  // namespace uffdm
