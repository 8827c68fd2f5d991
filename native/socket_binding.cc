// Socket options the agent needs and Node does not expose: kernel buffer
// sizes (how much bulk data can sit ahead of an urgent page), the unsent
// limit of the post-copy push, liveness (how soon a link that went silent is
// declared broken), and the pacing rate (an operator's bandwidth limit).
#include <errno.h>
#include <stdio.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include "args.h"
#include "bindings.h"
#include "errors.h"

namespace uffdm {

namespace {

void set_int(Napi::Env env, int fd, int level, int name, int value, const char* what) {
  if (setsockopt(fd, level, name, &value, sizeof value)) throw sys_error(env, -errno, what);
}

int get_int(Napi::Env env, int fd, int level, int name, const char* what) {
  int value = 0;
  socklen_t len = sizeof value;
  if (getsockopt(fd, level, name, &value, &len)) throw sys_error(env, -errno, what);
  return value;
}

// net.core.wmem_max / rmem_max: the most SO_SNDBUF / SO_RCVBUF give a process without CAP_NET_ADMIN.
long buffer_cap(int name) {
  FILE* f = fopen(name == SO_SNDBUF ? "/proc/sys/net/core/wmem_max" : "/proc/sys/net/core/rmem_max", "r");
  long cap = -1;
  if (f) {
    if (fscanf(f, "%ld", &cap) != 1) cap = -1;
    fclose(f);
  }
  return cap;
}

// One of a socket's kernel buffers, past net.core.{w,r}mem_max where this process may (SO_*BUFFORCE: CAP_NET_ADMIN),
// else up to that cap; whole: not at all if the cap would cut it (setting one turns the kernel's autotuning of it
// off for good, and autotuning may grow past the cap). Returns what the kernel granted in the caller's units (it
// reports twice the value set: its bookkeeping), 0 if left alone.
int set_buffer(Napi::Env env, int fd, int force_name, int name, int bytes, bool whole, const char* what) {
  if (setsockopt(fd, SOL_SOCKET, force_name, &bytes, sizeof bytes)) {
    if (errno != EPERM) throw sys_error(env, -errno, what);
    long cap = buffer_cap(name);
    if (whole && cap >= 0 && cap < bytes) return 0;
    set_int(env, fd, SOL_SOCKET, name, bytes, what);
  }
  return get_int(env, fd, SOL_SOCKET, name, what) / 2;
}

// setSocketBuffers(fd, sendBytes, receiveBytes, whole) -> { sendBytes, receiveBytes }: SO_SNDBUF / SO_RCVBUF of a
// connected socket (0 leaves one alone) and what the kernel granted: less than asked when capped by
// net.core.wmem_max / rmem_max (a process without CAP_NET_ADMIN), 0 when left alone (asked 0, or whole and capped).
Napi::Value SetSocketBuffers(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  int fd = (int)arg_index(info, 0, "fd", 1 << 30);
  int snd = (int)arg_index(info, 1, "sendBytes", 1 << 30);
  int rcv = (int)arg_index(info, 2, "receiveBytes", 1 << 30);
  bool whole = info.Length() > 3 && info[3].ToBoolean();
  auto out = Napi::Object::New(env);
  out.Set("sendBytes", snd ? set_buffer(env, fd, SO_SNDBUFFORCE, SO_SNDBUF, snd, whole, "setsockopt(SO_SNDBUF)") : 0);
  out.Set("receiveBytes", rcv ? set_buffer(env, fd, SO_RCVBUFFORCE, SO_RCVBUF, rcv, whole, "setsockopt(SO_RCVBUF)") : 0);
  return out;
}

// setSocketUnsentLimit(fd, bytes): TCP_NOTSENT_LOWAT. A writer waits (poll: not writable) while more than `bytes`
// written to the socket are not sent yet; what is in flight (the window) is not limited.
Napi::Value SetSocketUnsentLimit(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  int fd = (int)arg_index(info, 0, "fd", 1 << 30);
  int bytes = (int)arg_index(info, 1, "bytes", 1 << 30);
  set_int(env, fd, IPPROTO_TCP, TCP_NOTSENT_LOWAT, bytes, "setsockopt(TCP_NOTSENT_LOWAT)");
  return env.Undefined();
}

// setSocketLiveness(fd, timeoutMs): a connection whose peer stops answering
// fails with ETIMEDOUT after about timeoutMs, whether data is outstanding
// (TCP_USER_TIMEOUT) or the connection is idle (keepalive probes every second).
Napi::Value SetSocketLiveness(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  int fd = (int)arg_index(info, 0, "fd", 1 << 30);
  int timeout_ms = (int)arg_index(info, 1, "timeoutMs", 1 << 30);
  if (timeout_ms < 1000) throw Napi::RangeError::New(env, "expected timeoutMs >= 1000");
  set_int(env, fd, SOL_SOCKET, SO_KEEPALIVE, 1, "setsockopt(SO_KEEPALIVE)");
  set_int(env, fd, IPPROTO_TCP, TCP_KEEPIDLE, 1, "setsockopt(TCP_KEEPIDLE)");
  set_int(env, fd, IPPROTO_TCP, TCP_KEEPINTVL, 1, "setsockopt(TCP_KEEPINTVL)");
  set_int(env, fd, IPPROTO_TCP, TCP_KEEPCNT, timeout_ms / 1000, "setsockopt(TCP_KEEPCNT)");
  set_int(env, fd, IPPROTO_TCP, TCP_USER_TIMEOUT, timeout_ms, "setsockopt(TCP_USER_TIMEOUT)");
  return env.Undefined();
}

// setSocketPacing(fd, bytesPerSec) -> bytesPerSec granted: SO_MAX_PACING_RATE, the most this socket sends per second
// (0: no limit). The kernel paces TCP itself (the fq qdisc where one is set up, else TCP's own pacing), so a rate
// limit costs no thread and no timer here, and holds for whatever writes the socket (a native writer included).
Napi::Value SetSocketPacing(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  int fd = (int)arg_index(info, 0, "fd", 1 << 30);
  uint64_t rate = arg_index(info, 1, "bytesPerSec", 9007199254740991.0);
  uint64_t value = rate == 0 ? ~0ULL : rate;
  if (setsockopt(fd, SOL_SOCKET, SO_MAX_PACING_RATE, &value, sizeof value)) throw sys_error(env, -errno, "setsockopt(SO_MAX_PACING_RATE)");
  uint64_t got = 0;
  socklen_t len = sizeof got;
  if (getsockopt(fd, SOL_SOCKET, SO_MAX_PACING_RATE, &got, &len)) throw sys_error(env, -errno, "getsockopt(SO_MAX_PACING_RATE)");
  if (len == sizeof(uint32_t)) got = got == 0xffffffffULL ? ~0ULL : (uint32_t)got;
  return Napi::Number::New(env, got == ~0ULL ? 0 : (double)got);
}

}  // namespace

void init_socket_bindings(Napi::Env env, Napi::Object exports) {
  exports.Set("setSocketBuffers", Napi::Function::New(env, SetSocketBuffers));
  exports.Set("setSocketLiveness", Napi::Function::New(env, SetSocketLiveness));
  exports.Set("setSocketUnsentLimit", Napi::Function::New(env, SetSocketUnsentLimit));
  exports.Set("setSocketPacing", Napi::Function::New(env, SetSocketPacing));
}

}  // namespace uffdm
