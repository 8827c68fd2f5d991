// The exit watch of a destination in post-copy. A service thread blocked in a fault on a page that cannot arrive any
// more (the migration failed, or the agent that installs the pages is gone) never runs again: no handler on it, nor
// process.exit(), can end the process, and a process that looks alive but answers nothing hides the failure from its
// supervisor. A watch counts down from such an event and ends the process unless the service's thread takes the
// event in time. It is a plain thread, outside JavaScript, because the agent's thread may be what ended: its
// environment's cleanup hook starts the countdown as the worker goes away (an uncaught exception included).
//
// States: idle -> armed (the hand-off: pages may be missing from now on) -> idle (settled)
//         armed -> counting (a failure, or the agent ended while armed) -> ends the process after ms
//         counting -> armed (a standby agent took over from the one that ended: it armed the watch again)
//         counting -> idle (a receiver's agent crashed after it asked for the restore, before the service started)
//         armed -> armed (the same agent arms its will at the restore request, and again with the resume time)
//         any -> taken (the service's thread has the failure, or closes the guest itself): nothing more is done
//
// The successor: an agent that arms the watch leaves a will (what a new agent needs to go on: the session, the
// held userfaultfd, the listening port). A standby agent waits on one end of a socket pair (exitWatchSucceed); when
// the armed agent's environment ends, the watch writes the will there, and the standby takes over and arms the watch
// again before the countdown ends. The teardown hook is registered as the agent starts (exitWatchBind), before its
// userfaultfd and native threads exist: hooks run newest first, so those are closed and joined by the time the will
// goes out, and the standby never races a thread of the agent that ended for the same faults.
#include <errno.h>
#include <napi.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>

#include "args.h"
#include "bindings.h"
#include "errors.h"

namespace uffdm {

namespace {

enum class WatchState { Idle, Armed, Counting, Taken };

struct Watch {
  WatchState state = WatchState::Idle;
  int code = 0;
  uint32_t ms = 0;
  std::string line;        // armed: written if the agent ends before it settled
  uint64_t countdown = 0;  // which countdown is current (a thread of an older one finds it changed)
  napi_env armed_by = nullptr;  // the environment whose end starts the countdown
  std::string will;             // armed: written to the successor when armed_by ends ("" : nothing to take over)
  int successor_fd = -1;        // a standby's socket (exitWatchSucceed)
  bool will_left = false;       // armed_by ended before a standby waited: the next one to wait gets the will at once
};

struct Registry {
  std::mutex mu;
  std::condition_variable changed;
  std::map<uint32_t, Watch> watches;
  std::set<std::pair<napi_env, uint32_t>> bound;  // environments with a teardown hook for a watch
  uint32_t next = 1;
};

// Never destroyed: a countdown thread may still wait on it while the process exits.
Registry& registry() {
  static Registry* r = new Registry();
  return *r;
}

void write_line(const std::string& line) {
  const char* p = line.data();
  size_t left = line.size();
  while (left > 0) {
    ssize_t n = write(2, p, left);
    if (n <= 0) return;  // stderr closed or full: nobody to tell
    p += n;
    left -= (size_t)n;
  }
}

// With r.mu held. false: no thread could be started (the caller says so).
bool start_countdown(Registry& r, uint32_t id, Watch& w, int code, uint32_t ms, std::string line) {
  w.state = WatchState::Counting;
  uint64_t mine = ++w.countdown;
  try {
    std::thread([id, code, ms, line = std::move(line), mine] {
      Registry& r = registry();
      std::unique_lock<std::mutex> lock(r.mu);
      bool over = r.changed.wait_for(lock, std::chrono::milliseconds(ms), [&] {
        auto it = r.watches.find(id);
        return it == r.watches.end() || it->second.state != WatchState::Counting || it->second.countdown != mine;
      });
      if (over) return;
      write_line(line);
      _exit(code);
    }).detach();
    return true;
  } catch (const std::system_error&) {
    return false;
  }
}

struct HookArg {
  uint32_t id;
  napi_env env;
};

void close_successor(Watch& w) {
  if (w.successor_fd >= 0) ::close(w.successor_fd);
  w.successor_fd = -1;
}

// The will, to a standby that waits for it (one line; the socket's buffer holds it whole: it is a few hundred bytes).
void hand_over(Watch& w) {
  if (w.successor_fd < 0 || w.will.empty()) return;
  std::string line = w.will + "\n";
  const char* p = line.data();
  size_t left = line.size();
  while (left > 0) {
    ssize_t n = send(w.successor_fd, p, left, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n <= 0) break;  // the standby is gone: the countdown below decides
    p += n;
    left -= (size_t)n;
  }
  if (left == 0) w.will.clear();  // the standby owns what it holds now (a disarm must not hand it out again)
  close_successor(w);
}

// An agent's environment goes away (the worker ended: closed, crashed, or the process exits).
void on_teardown(void* arg) {
  HookArg a = *static_cast<HookArg*>(arg);
  delete static_cast<HookArg*>(arg);
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  r.bound.erase({a.env, a.id});
  auto it = r.watches.find(a.id);
  if (it == r.watches.end() || it->second.state != WatchState::Armed || it->second.armed_by != a.env) return;
  Watch& w = it->second;
  if (!start_countdown(r, a.id, w, w.code, w.ms, w.line)) write_line("uffd-migrate: the exit watch could not start a thread\n");
  w.will_left = w.successor_fd < 0 && !w.will.empty();  // a standby still starting
  hand_over(w);
}

// With r.mu held: env's end is watched for id (once per environment).
void bind_env(napi_env env, Registry& r, uint32_t id) {
  if (r.bound.count({env, id})) return;
  auto* arg = new HookArg{id, env};
  if (napi_add_env_cleanup_hook(env, on_teardown, arg) != napi_ok) {
    delete arg;
    throw Napi::Error::New(env, "napi_add_env_cleanup_hook failed");
  }
  r.bound.insert({env, id});
}

Watch* find(uint32_t id) {
  auto& ws = registry().watches;
  auto it = ws.find(id);
  return it == ws.end() ? nullptr : &it->second;
}

Napi::Value Unknown(const Napi::Env& env, uint32_t id) {
  throw Napi::RangeError::New(env, "no exit watch " + std::to_string(id));
}

// (id, code, ms, line): arm's and fire's arguments, checked before the registry is locked.
struct CountdownArgs {
  uint32_t id;
  int code;
  uint32_t ms;
  std::string line;
};

CountdownArgs countdown_args(const Napi::CallbackInfo& info) {
  CountdownArgs a{(uint32_t)arg_index(info, 0, "id", UINT32_MAX), (int)arg_index(info, 1, "code", 255),
                  (uint32_t)arg_index(info, 2, "ms", 3600000), {}};
  if (info.Length() < 4 || !info[3].IsString()) throw Napi::TypeError::New(info.Env(), "expected line to be a string");
  a.line = info[3].As<Napi::String>().Utf8Value();
  return a;
}

// exitWatchCreate(): a new watch, idle; its id (the service's thread makes it and hands it to the agent).
Napi::Value Create(const Napi::CallbackInfo& info) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  uint32_t id = r.next++;
  r.watches[id] = Watch{};
  return Napi::Number::New(info.Env(), id);
}

// exitWatchBind(id): the calling agent's end is watched from now on (call it as the agent starts: see the top).
Napi::Value Bind(const Napi::CallbackInfo& info) {
  uint32_t id = (uint32_t)arg_index(info, 0, "id", UINT32_MAX);
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  if (!find(id)) return Unknown(info.Env(), id);
  bind_env(info.Env(), r, id);
  return info.Env().Undefined();
}

// exitWatchArm(id, code, ms, line, will?): from the hand-off on; if the calling thread's environment ends before a
// disarm, the countdown starts with this line (and a standby gets the will). Called on the agent's thread (with its will at
// the restore request, again with the resume time); also by a standby that took over, which stops the countdown its
// predecessor's end started. false once taken.
Napi::Value Arm(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  CountdownArgs a = countdown_args(info);
  std::string will = info.Length() > 4 && info[4].IsString() ? info[4].As<Napi::String>().Utf8Value() : "";
  uint32_t id = a.id;
  Registry& r = registry();
  {
    std::lock_guard<std::mutex> lock(r.mu);
    Watch* w = find(id);
    if (!w) return Unknown(env, id);
    if (w->state == WatchState::Taken) return Napi::Boolean::New(env, false);
    bind_env(env, r, id);
    w->state = WatchState::Armed;
    w->code = a.code;
    w->ms = a.ms;
    w->line = std::move(a.line);
    w->armed_by = env;
    w->will = std::move(will);
    w->will_left = false;
  }
  r.changed.notify_all();  // a countdown that was running sees the state change and ends
  return Napi::Boolean::New(env, true);
}

// exitWatchSucceed(id) -> fd: the calling standby's end of a socket pair, where the armed agent's will arrives (one
// line) when its environment ends. One standby per watch (a new call replaces the last one's socket).
Napi::Value Succeed(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  uint32_t id = (uint32_t)arg_index(info, 0, "id", UINT32_MAX);
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  Watch* w = find(id);
  if (!w) return Unknown(env, id);
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) throw sys_error(env, -errno, "socketpair");
  close_successor(*w);
  w->successor_fd = sv[0];
  if (w->state == WatchState::Counting && w->will_left) hand_over(*w);  // the agent ended while this one started
  w->will_left = false;
  return Napi::Number::New(env, sv[1]);
}

// exitWatchDisarm(id) -> the will it held, or undefined: settled, or (a receiver) its agent crashed before the
// service started: an armed or counting watch is idle again (its teardown hook then does nothing; a countdown ends
// without ending the process). Nobody takes the will over now: what it holds open (the crashed agent's userfaultfd,
// which keeps the regions registered) is the caller's to close.
Napi::Value Disarm(const Napi::CallbackInfo& info) {
  uint32_t id = (uint32_t)arg_index(info, 0, "id", UINT32_MAX);
  Registry& r = registry();
  std::string will;
  {
    std::lock_guard<std::mutex> lock(r.mu);
    Watch* w = find(id);
    if (!w) return Unknown(info.Env(), id);
    if (w->state == WatchState::Armed || w->state == WatchState::Counting) w->state = WatchState::Idle;
    close_successor(*w);  // nothing to take over now: the standby reads the end of its socket
    w->will_left = false;
    will.swap(w->will);
  }
  r.changed.notify_all();
  return will.empty() ? info.Env().Undefined() : Napi::String::New(info.Env(), will);
}

// exitWatchFire(id, code, ms, line): a failure the service's thread must take within ms, or the process ends with
// code after writing line. false: not armed (before the hand-off the service's thread never waits on a page), or
// taken already.
Napi::Value Fire(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  CountdownArgs a = countdown_args(info);
  uint32_t id = a.id;
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  Watch* w = find(id);
  if (!w) return Unknown(env, id);
  if (w->state != WatchState::Armed && w->state != WatchState::Counting) return Napi::Boolean::New(env, false);
  close_successor(*w);  // a failure: nothing for a standby to take over
  w->will_left = false;
  if (!start_countdown(r, id, *w, a.code, a.ms, std::move(a.line))) throw Napi::Error::New(env, "could not start the exit watch's thread");
  return Napi::Boolean::New(env, true);
}

// exitWatchTake(id): the service's thread has the failure (or closes the guest): no countdown ends the process now.
// Called on the service's thread.
Napi::Value Take(const Napi::CallbackInfo& info) {
  uint32_t id = (uint32_t)arg_index(info, 0, "id", UINT32_MAX);
  Registry& r = registry();
  {
    std::lock_guard<std::mutex> lock(r.mu);
    Watch* w = find(id);
    if (!w) return Unknown(info.Env(), id);
    w->state = WatchState::Taken;
    close_successor(*w);
  }
  r.changed.notify_all();
  return info.Env().Undefined();
}

}  // namespace

void init_exit_watch_bindings(Napi::Env env, Napi::Object exports) {
  exports.Set("exitWatchCreate", Napi::Function::New(env, Create));
  exports.Set("exitWatchBind", Napi::Function::New(env, Bind));
  exports.Set("exitWatchArm", Napi::Function::New(env, Arm));
  exports.Set("exitWatchSucceed", Napi::Function::New(env, Succeed));
  exports.Set("exitWatchDisarm", Napi::Function::New(env, Disarm));
  exports.Set("exitWatchFire", Napi::Function::New(env, Fire));
  exports.Set("exitWatchTake", Napi::Function::New(env, Take));
}

}  // namespace uffdm
