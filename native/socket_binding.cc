// Socket options the agent needs and Node does not expose: kernel buffer
// sizes (how much bulk data can sit ahead of an urgent page) and liveness
// (how soon a link that went silent is declared broken).
#include <errno.h>
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

// setSocketBuffers(fd, sendBytes, receiveBytes): SO_SNDBUF / SO_RCVBUF of a
// connected socket (0 leaves one alone).
Napi::Value SetSocketBuffers(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  int fd = (int)arg_index(info, 0, "fd", 1 << 30);
  int snd = (int)arg_index(info, 1, "sendBytes", 1 << 30);
  int rcv = (int)arg_index(info, 2, "receiveBytes", 1 << 30);
  if (snd) set_int(env, fd, SOL_SOCKET, SO_SNDBUF, snd, "setsockopt(SO_SNDBUF)");
  if (rcv) set_int(env, fd, SOL_SOCKET, SO_RCVBUF, rcv, "setsockopt(SO_RCVBUF)");
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

}  // namespace

void init_socket_bindings(Napi::Env env, Napi::Object exports) {
  exports.Set("setSocketBuffers", Napi::Function::New(env, SetSocketBuffers));
  exports.Set("setSocketLiveness", Napi::Function::New(env, SetSocketLiveness));
}

}  // namespace uffdm
