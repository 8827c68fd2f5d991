// The exit watch of a destination in post-copy. A service thread blocked in a fault on a page that cannot arrive any
// more (the migration failed, or the agent that installs the pages is gone) never runs again: no handler on it, nor
// process.exit(), can end the process, and a process that looks alive but answers nothing hides the failure from its
// supervisor. A watch counts down from such an event and ends the process unless the service's thread takes the
// event in time. It is a plain thread, outside JavaScript, because the agent's thread may be what ended: its
// environment's cleanup hook starts the countdown as the worker goes away (an uncaught exception included).
//
// States: idle -> armed (the hand-off: pages may be missing from now on) -> idle (settled)
//         armed -> counting (a failure, or the agent ended while armed) -> ends the process after ms
//         any -> taken (the service's thread has the failure, or closes the guest itself): nothing more is done
#include <napi.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <thread>

#include "args.h"
#include "bindings.h"

namespace uffdm {

namespace {

enum class WatchState { Idle, Armed, Counting, Taken };

struct Watch {
  WatchState state = WatchState::Idle;
  int code = 0;
  uint32_t ms = 0;
  std::string line;        // armed: written if the agent ends before it settled
  uint64_t countdown = 0;  // which countdown is current (a thread of an older one finds it changed)
};

struct Registry {
  std::mutex mu;
  std::condition_variable changed;
  std::map<uint32_t, Watch> watches;
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
};

// The agent's environment goes away (the worker ended: closed, crashed, or the process exits).
void on_teardown(void* arg) {
  uint32_t id = static_cast<HookArg*>(arg)->id;
  delete static_cast<HookArg*>(arg);
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  auto it = r.watches.find(id);
  if (it == r.watches.end() || it->second.state != WatchState::Armed) return;
  Watch& w = it->second;
  if (!start_countdown(r, id, w, w.code, w.ms, w.line)) write_line("uffd-migrate: the exit watch could not start a thread\n");
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

// exitWatchArm(id, code, ms, line): from the hand-off on; if the calling thread's environment ends before a disarm,
// the countdown starts with this line. Called on the agent's thread.
Napi::Value Arm(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  CountdownArgs a = countdown_args(info);
  uint32_t id = a.id;
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  Watch* w = find(id);
  if (!w) return Unknown(env, id);
  if (w->state != WatchState::Idle) return Napi::Boolean::New(env, false);
  auto* arg = new HookArg{id};
  if (napi_add_env_cleanup_hook(env, on_teardown, arg) != napi_ok) {
    delete arg;
    throw Napi::Error::New(env, "napi_add_env_cleanup_hook failed");
  }
  *w = Watch{WatchState::Armed, a.code, a.ms, std::move(a.line), w->countdown};
  return Napi::Boolean::New(env, true);
}

// exitWatchDisarm(id): settled; an armed watch is idle again (its teardown hook then does nothing).
Napi::Value Disarm(const Napi::CallbackInfo& info) {
  uint32_t id = (uint32_t)arg_index(info, 0, "id", UINT32_MAX);
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  Watch* w = find(id);
  if (!w) return Unknown(info.Env(), id);
  if (w->state == WatchState::Armed) w->state = WatchState::Idle;
  return info.Env().Undefined();
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
  }
  r.changed.notify_all();
  return info.Env().Undefined();
}

}  // namespace

void init_exit_watch_bindings(Napi::Env env, Napi::Object exports) {
  exports.Set("exitWatchCreate", Napi::Function::New(env, Create));
  exports.Set("exitWatchArm", Napi::Function::New(env, Arm));
  exports.Set("exitWatchDisarm", Napi::Function::New(env, Disarm));
  exports.Set("exitWatchFire", Napi::Function::New(env, Fire));
  exports.Set("exitWatchTake", Napi::Function::New(env, Take));
}

}  // namespace uffdm
