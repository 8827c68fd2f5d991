// The sealed record layer of encrypted migrations in C++, in step with src/protocol/records.ts: SEALED frames
// (u32 length | 0xE0 | ciphertext | 16-byte tag), AES-256-GCM with the five-byte header as AAD, the nonce the
// direction's IV XOR its record sequence number, at most 256 KiB of plaintext a record, the key rotated by HKDF
// every `rekey_bytes`. JS seals and opens a connection until it hands a direction over to native code with its
// key, IV, sequence number and bytes under the key. OpenSSL's EVP: the library Node links and exports.
//
// Every native thread that moves pages seals or opens its own connection (Link below): the source's bulk writer
// seals from region memory into records, the destination's bulk reader opens records straight into its staging
// buffer where a record fits, the demand threads both ways. No thread between them and the socket: an earlier
// relay thread per direction (through a socketpair) cost a copy and two wake-ups a record, and a fault's round
// trip crossed four more threads (measured in README's "Encrypted migrations").
#pragma once
#include <errno.h>
#include <openssl/evp.h>
#include <sys/uio.h>

#include <napi.h>

#include <cstddef>
#include <cstdint>
#include <atomic>
#include <memory>
#include <vector>

#include "page_maps.h"

namespace uffdm {
namespace records {

constexpr uint8_t kSealed = 0xe0;
constexpr size_t kHeader = 5, kTag = 16, kMaxPlain = 256 << 10;  // records.ts: SEALED, TAG_BYTES, MAX_RECORD_PLAINTEXT
constexpr size_t kRecordMax = kHeader + kMaxPlain + kTag;
// A part of a write at least this long (a frame's pages) is sealed in records of its own: the bulk reader reads a
// frame this large straight into its staging buffer (bulk.cc's kDirectBytes), and opens such records there.
constexpr size_t kAlignBytes = 64 << 10;

// How a sealed connection ended, as the CLOSED events' second number says it (src/agent/demand-events.ts, LinkEnd):
// 0 the socket (errno, or its end), 1 a plaintext frame broke the protocol, 2 bytes that are not a record, 3 a
// record whose tag failed (changed, dropped, replayed, reordered).
enum : int { kEnded = 0, kMalformed = 1, kNotARecord = 2, kTagFailed = 3 };

// One direction's key and nonces, kept in step with records.ts's Direction.
struct Direction {
  uint8_t key[32], iv[12];
  uint64_t seq = 0;
  uint64_t under_key = 0, rekey_bytes = 0;

  // The next record's nonce (and the sequence number moves on).
  void nonce(uint8_t out[12]);
  // `bytes` of plaintext went under the key: at rekey_bytes the key rotates.
  void count(size_t bytes);
};

// Seals the first n bytes gathered from iov (n <= kMaxPlain) into rec (kRecordMax bytes): the record's length, 0
// when OpenSSL failed.
size_t seal(EVP_CIPHER_CTX* ctx, Direction& dir, const iovec* iov, int iovcnt, size_t n, uint8_t* rec);

// The record at p (have bytes there): its whole length (header included), 0 when it has not all arrived; -1 when
// the bytes are not a record.
long record_length(const uint8_t* p, size_t have);

// Opens the whole record at rec (record_length() bytes) into out (kMaxPlain bytes): its plaintext's length, -1 when
// its tag failed (nothing of it may be used).
long open(EVP_CIPHER_CTX* ctx, Direction& dir, const uint8_t* rec, size_t len, uint8_t* out);

// A direction's state as JS hands it over ({ key, iv, seq, bytesUnderKey, rekeyBytes }: records.ts's SealState).
Direction direction_arg(Napi::Env env, const Napi::Value& v);

// A native thread's view of its connection: plain (the socket as it is) or sealed on this thread, either direction
// or both (the demand threads both ways, the bulk writer what it writes, the bulk reader what it reads).
class Link {
 public:
  Link() = default;
  Link(const Link&) = delete;
  Link& operator=(const Link&) = delete;
  ~Link();
  // Sealed from now on: each direction's state (nullptr: that direction stays plain), and the sealed bytes JS had
  // read and not opened.
  bool seal(const Direction* send, const Direction* recv, std::vector<uint8_t> cipher_head = {});
  // Plaintext, or a whole record, that is here already: read it before polling the socket.
  bool pending() const;
  // Whole-run writes (sealed: as records; a part of kAlignBytes or more in records of its own) on a non-blocking
  // socket; write_all()'s contract (demand.h).
  bool write_all(int fd, int stop_fd, iovec* iov, int iovcnt, int* err);
  // read(2) on the plaintext: bytes, 0 at the end of the stream, -1 with errno set (EAGAIN: nothing yet). A
  // failed record: -1, errno EBADMSG, and end() says which way.
  ssize_t read(int fd, uint8_t* dst, size_t n);
  // read_parts() (page_maps.h) on the plaintext; counter adds the bytes the parts and the extra took.
  int read_parts(int fd, const ReadPart* parts, int n, uint8_t* extra, size_t* extra_have, size_t extra_need,
                 std::atomic<uint64_t>* counter = nullptr);
  // Bytes the socket must still deliver before `plain` more bytes of plaintext can be read (at least; none pending
  // here): what a low-water mark may wait for (SO_RCVLOWAT). A record begun here needs its rest whatever it holds.
  size_t socket_bytes_for(size_t plain) const;
  // After a failed read: kNotARecord or kTagFailed (kEnded for a socket's error or end).
  int end() const { return end_; }
  // How the connection ended after a read failed with err (errno, or -errno): a failed record says which way.
  int how(int err) const { return err == EBADMSG || err == -EBADMSG ? end_ : kEnded; }
  // Sealed: the ciphertext read from the socket is added here as it arrives (a record's bytes count before it is
  // whole: a watchdog sees them arrive).
  void count_sealed_bytes(std::atomic<uint64_t>* counter) { sealed_counter_ = counter; }

 private:
  // Reads what the socket has and opens each whole record (none pending here): into `direct` while a record's
  // plaintext fits in its `room` (*opened_direct counts those bytes; the caller's buffer, no copy), the rest into
  // the plaintext buffer. > 0 plaintext was opened, 0 would block, -EPIPE the end of the stream, -errno; -EBADMSG a
  // record failed (end_).
  int fill(int fd, uint8_t* direct = nullptr, size_t room = 0, size_t* opened_direct = nullptr);
  bool drained_ = false;  // the last read of the socket found fewer bytes than it asked for
  std::atomic<uint64_t>* sealed_counter_ = nullptr;
  size_t take(uint8_t* dst, size_t n);

  EVP_CIPHER_CTX* ctx_ = nullptr;
  bool seal_send_ = false, open_recv_ = false;
  Direction send_, recv_;
  std::vector<uint8_t> in_, plain_, rec_;
  size_t in_begin_ = 0, in_end_ = 0, plain_begin_ = 0, plain_end_ = 0;
  int end_ = kEnded;
};

// A native thread's connection from JS arguments: the object { send?, recv?, cipherHead? } (Channel.handOverSealed()
// and the sealer's handOff(): each direction given is sealed, the others plain); undefined or null: plain. Throws
// a TypeError for anything else.
std::unique_ptr<Link> link_arg(Napi::Env env, const Napi::Value& v);
// The same from argument i (absent: plain).
inline std::unique_ptr<Link> link_arg(const Napi::CallbackInfo& info, size_t i) {
  return link_arg(info.Env(), info.Length() > i ? info[i] : info.Env().Undefined());
}

}  // namespace records
}  // namespace uffdm
