// Dirty-page tracking for kernels without UFFD_FEATURE_WP_ASYNC and
// PAGEMAP_SCAN (Linux 5.7-6.6): synchronous write-protect. Every page of a
// region is write-protected; the first write to a page in a round faults to
// a native thread here, which records the page in a dirty bitmap and
// un-protects it (one fault round trip per page per round, the cost of this
// tracker). A round's collect() takes the bitmap and re-protects exactly the
// pages it held: every other page is still protected.
//
// Never-touched pages carry no write-protect bit before WP_UNPOPULATED (6.4),
// so the regions are registered MISSING too: the first touch of such a page
// faults here as well, and is zero-filled with UFFDIO_ZEROPAGE and counted as
// written. (A write after that zero page would copy it without a WP fault.)
// One path for every kernel: the forced fallback on a new kernel runs exactly
// what a 6.1 host runs.
//
// Invariant (no lost write), without a lock between the two sides: the thread un-protects a page *before* it
// marks it (atomically), and wakes the writer only after the mark (so a write that completed is always marked: the
// hand-off's final peek sees it); collect() takes the bitmap (atomic exchange per word) *before* it re-protects
// what it took. A mark that lands before the take: the page is taken, and re-protected after it was un-protected,
// before its content is read. A mark after the take: the page is in the next bitmap. A page can fault only while
// protected, so a taken page is never un-protected again by a fault older than the take. (A mutex over both made
// every fault wait out a collect's ioctls: ~14 us a run, 8-13 ms a round here.) collect() re-protects more than it
// took where that is cheaper (REPROTECT_MERGE_GAP_PAGES): re-protecting a page never loses a write. One ioctl that
// un-protects and wakes, with a mark before and after it, would save a system call, but in the idle class (below)
// the woken writer preempts the thread before the second mark: a page written in one round shows up in the next too.
// (UFFDIO_WRITEPROTECT refuses MODE_WP with MODE_DONTWAKE: protecting never wakes anyway.)
//
// The thread follows the writer's CPU (followWriter): a round trip where the writer and this thread sit on two
// CPUs costs two cross-CPU wake-ups, and on a VM each of them wakes a halted vCPU. Measured here (C, warm memory):
// ~90-100 us a write fault split, 8.6-12 us when the thread runs on the writer's CPU (the writer blocks, its CPU
// switches to this thread at once, and the wake-up stays local). So the thread reads, at most once a millisecond,
// which CPU the last faulting thread (UFFD_FEATURE_THREAD_ID) was on (/proc/self/task/TID/stat, ~5 us) and sets
// its own affinity to that CPU. The writer is never pinned; when the scheduler moves it, the thread follows
// within a millisecond.
//
// Following alone was not enough: this thread wakes the writer while it still runs on the writer's CPU, so the
// scheduler puts the writer on the other CPU if it is idle (select_idle_sibling), the next round trip crosses
// CPUs, and the thread follows again (~300-900 moves a second in bench:native). So the thread runs in SCHED_IDLE:
// a CPU running only idle-class work counts as idle, the woken writer stays on it and preempts this thread at
// once (the rest of its loop runs when the writer next blocks). C, a writer faulting back to back: 10.7 us a
// fault against 115 us following in the normal class; bench:native's 10k-writes/s guest lost ~30 % of its compute
// against ~64 % (6 alternating pairs, medians). An idle-class thread gets almost no CPU beside a busy one, though
// (C: 18 ms a fault with a busy thread on each CPU). So a guard thread (normal class, a 2 ms tick) checks
// whether a fault has been waiting across two ticks while this thread resolved none, and if so puts it back in
// the normal class for 100 ms, doubling each time it happens again (up to 3.2 s), then tries the idle class again.
// Without following it stays in the normal class (on any CPU the idle class would only add the starvation risk).
//
// A collect's re-protect runs off the writer's CPU (AwayFromCpu): it walks thousands of pages (4-8 ms a collect at
// 10k writes/s), and where the scheduler had put the calling thread on the writer's CPU (~20-30 % of collects in
// bench:native) the writer shared its CPU with it and its faults waited behind it (the idle-class fault thread does
// not run beside a normal-class thread). Measured, bench:native trackers at 10k writes/s, 6 runs in one process,
// compute lost min / median / max: 13.5 / 14.5 / 25.0 % in place, 6.7 / 8.6 / 14.4 % moved away.
//
// Presence (what round 0 sends) comes from /proc/self/pagemap (pagemap_present()).
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <thread>
#include <vector>

#include "args.h"
#include "bindings.h"
#include "errors.h"
#include "kernel_compat.h"
#include "page_maps.h"
#include "pagemap.h"
#include "region.h"
#include "thread_util.h"
#include "uffd.h"

namespace uffdm {

namespace {

struct Tracked {
  std::shared_ptr<Mapping> m;
  uint32_t pages;
  std::vector<uint32_t> dirty;  // one bit per page; set by the thread (atomic or), taken by collect() (atomic exchange)
};

// Runs of set bits in words[0 .. pages); clears them when take.
std::vector<uint32_t> bit_runs(std::vector<uint32_t>& words, uint32_t pages, bool take) {
  std::vector<uint32_t> runs;
  for (uint32_t w = 0; w < words.size(); w++) {
    uint32_t v = __atomic_load_n(&words[w], __ATOMIC_ACQUIRE);
    if (!v) continue;
    if (take) v = __atomic_exchange_n(&words[w], 0, __ATOMIC_ACQ_REL);
    while (v) {
      uint32_t lo = __builtin_ctz(v);
      uint32_t hi = (~v >> lo) ? lo + __builtin_ctz(~v >> lo) : 32;  // first clear bit after lo
      uint32_t first = w * 32 + lo, end = std::min(pages, w * 32 + hi);
      if (first < end) append_run(&runs, first, end - first);
      v = hi == 32 ? 0 : v & ~(((1u << hi) - 1) & ~((1u << lo) - 1));
    }
  }
  return runs;
}

Napi::Uint32Array to_js(Napi::Env env, const std::vector<uint32_t>& runs) {
  auto out = Napi::Uint32Array::New(env, runs.size());
  std::copy(runs.begin(), runs.end(), out.Data());
  return out;
}

// The CPU a thread of this process last ran on (/proc/self/task/TID/stat, field 39), read through *fd (kept open for
// *fd_tid); -1 when it cannot be read (the thread ended, no /proc).
int thread_last_cpu(int tid, int* fd, int* fd_tid) {
  if (*fd_tid != tid) {
    if (*fd >= 0) ::close(*fd);
    char path[64];
    snprintf(path, sizeof path, "/proc/self/task/%d/stat", tid);
    *fd = open(path, O_RDONLY | O_CLOEXEC);
    *fd_tid = *fd >= 0 ? tid : 0;
    if (*fd < 0) return -1;
  }
  char b[1024];
  ssize_t n = pread(*fd, b, sizeof b - 1, 0);
  if (n <= 0) return -1;
  b[n] = 0;
  const char* p = strrchr(b, ')');  // the name (field 2) may hold spaces and parentheses
  if (!p) return -1;
  for (int field = 2; *p; p++) {
    if (*p == ' ' && ++field == 39) return atoi(p + 1);
  }
  return -1;
}

// Whether a thread of this process may go back from SCHED_IDLE to the normal class: the kernel treats the idle
// class as nice 20 and lets a thread leave it only with CAP_SYS_NICE or an RLIMIT_NICE that allows its nice value
// (an unprivileged process has neither by default). Tried on a short-lived thread of its own.
bool idle_class_reversible() {
  bool ok = false;
  std::thread probe([&ok] {
    run_at_service_nice();  // the fault thread's nice value: what leaving the idle class is checked against
    sched_param sp{};
    ok = sched_setscheduler(0, SCHED_IDLE, &sp) == 0 && sched_setscheduler(0, SCHED_OTHER, &sp) == 0;
  });
  probe.join();
  return ok;
}

// While it lives, the calling thread may run on any CPU it was allowed but `cpu` (unless that leaves none); its own
// CPU mask is put back after.
class AwayFromCpu {
 public:
  explicit AwayFromCpu(int cpu) {
    if (cpu < 0 || sched_getaffinity(0, sizeof saved_, &saved_) != 0 || !CPU_ISSET(cpu, &saved_)) return;
    cpu_set_t away = saved_;
    CPU_CLR(cpu, &away);
    moved_ = CPU_COUNT(&away) > 0 && sched_setaffinity(0, sizeof away, &away) == 0;
  }
  ~AwayFromCpu() {
    if (moved_) (void)sched_setaffinity(0, sizeof saved_, &saved_);
  }
  bool moved() const { return moved_; }

 private:
  cpu_set_t saved_;
  bool moved_ = false;
};

class SyncWpTracker : public Napi::ObjectWrap<SyncWpTracker> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "SyncWpTracker",
                       {
                           InstanceMethod("collect", &SyncWpTracker::Collect),
                           InstanceMethod("peek", &SyncWpTracker::Peek),
                           InstanceMethod("present", &SyncWpTracker::Present),
                           InstanceMethod("close", &SyncWpTracker::Close),
                           InstanceAccessor("stats", &SyncWpTracker::Stats, nullptr),
                       });
  }

  // new SyncWpTracker(regionIds: number[], followWriter = true): registers MISSING|WP, protects every page, starts
  // the thread (on the writer's CPU when followWriter, see the top of this file).
  explicit SyncWpTracker(const Napi::CallbackInfo& info) : Napi::ObjectWrap<SyncWpTracker>(info) {
    auto env = info.Env();
    if (info.Length() < 1 || !info[0].IsArray()) throw Napi::TypeError::New(env, "expected regionIds: number[]");
    bool follow = arg_bool(info, 1, "followWriter", true), idle_class = arg_bool(info, 2, "idleClass", true);
    auto ids = info[0].As<Napi::Array>();
    const size_t ps = page_size();
    for (uint32_t i = 0; i < ids.Length(); i++) {
      auto m = region_find((uint32_t)ids.Get(i).As<Napi::Number>().Uint32Value());
      if (!m) throw lib_error(env, "ERR_REGION_RELEASED", "region was released");
      uint32_t pages = (uint32_t)(m->size / ps);
      regions_.push_back({m, pages, std::vector<uint32_t>((pages + 31) / 32, 0)});
    }
    const char* call = "userfaultfd";
    // the faulting thread's id, where the kernel has it (4.14+): the thread follows that thread's CPU
    uint64_t have = 0;
    if (follow && uffd_probe_features(&have, nullptr, nullptr) == 0 && (have & UFFD_FEATURE_THREAD_ID)) follow_ = true;
    uffd_ = uffd_open(true, &call);
    if (uffd_ < 0) throw sys_error(env, uffd_, call);
    int e = uffd_api(uffd_, follow_ ? UFFD_FEATURE_THREAD_ID : 0, nullptr, nullptr);
    if (!e) {
      for (auto& r : regions_) {
        e = uffd_register(uffd_, r.m->addr(), r.m->size, UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP, nullptr);
        if (e) { call = "ioctl(UFFDIO_REGISTER)"; break; }
        e = uffd_writeprotect(uffd_, r.m->addr(), r.m->size, true, true);
        if (e) { call = "ioctl(UFFDIO_WRITEPROTECT)"; break; }
      }
    } else {
      call = "ioctl(UFFDIO_API)";
    }
    if (!e) {
      stop_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
      if (stop_fd_ < 0) e = -errno, call = "eventfd";
    }
    if (e) {
      ::close(uffd_);  // closing drops every registration and its protection
      uffd_ = -1;
      throw sys_error(env, e, call);
    }
    const bool following = follow_;  // read before the thread starts: from then on the thread alone may clear it
    thread_ = start_thread(
        [this] {
          run_at_service_nice();  // the service's threads wait on this one (before the name: see demand.cc, DemandThread::start)
          fault_tid_ = (pid_t)syscall(SYS_gettid);
          pthread_setname_np(pthread_self(), "uffdm-wp");
        },
        [this] { run(); });
    // idle class only with following (see the top of this file), and only where a thread may leave it again
    if (following && idle_class && idle_class_reversible() && set_class(SCHED_IDLE)) {
      guard_ = start_thread(
          [] {
            run_at_service_nice();
            pthread_setname_np(pthread_self(), "uffdm-wp-guard");
          },
          [this] { guard(); });
    }
    napi_add_env_cleanup_hook(env, &SyncWpTracker::Cleanup, this);
  }

  ~SyncWpTracker() override { Shutdown(); }

 private:
  static void Cleanup(void* arg) { static_cast<SyncWpTracker*>(arg)->Shutdown(); }

  // Joins the thread, then closes the userfaultfd: the kernel drops the registrations (and wakes any waiter).
  void Shutdown() {
    if (uffd_ < 0) return;
    napi_remove_env_cleanup_hook(Env(), &SyncWpTracker::Cleanup, this);
    uint64_t one = 1;
    (void)!write(stop_fd_, &one, sizeof one);
    if (guard_.joinable()) guard_.join();  // first: it changes the fault thread's class by thread id
    if (idle_now_) set_class(SCHED_OTHER);  // so that a busy CPU does not hold up its exit
    if (thread_.joinable()) thread_.join();
    for (auto& r : regions_) (void)uffd_unregister(uffd_, r.m->addr(), r.m->size);
    ::close(uffd_);
    ::close(stop_fd_);
    uffd_ = stop_fd_ = -1;
  }

  void run() {
    const size_t ps = page_size();
    uffd_msg msgs[64];
    int stat_fd = -1, stat_tid = 0;
    double checked_us = 0;
    while (wait_fd(uffd_, POLLIN, stop_fd_)) {
      ssize_t n = read(uffd_, msgs, sizeof msgs);
      if (n <= 0) continue;  // EAGAIN: another wake-up took it
      int writer = 0;
      for (size_t i = 0; i < (size_t)n / sizeof(uffd_msg); i++) {
        if (msgs[i].event != UFFD_EVENT_PAGEFAULT) continue;
        writer = (int)msgs[i].arg.pagefault.feat.ptid;
        uintptr_t addr = (uintptr_t)msgs[i].arg.pagefault.address & ~(uintptr_t)(ps - 1);
        int e;
        if (msgs[i].arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP) {
          e = uffd_writeprotect(uffd_, addr, ps, false, false);  // writable, the writer still asleep
          wp_faults_++;
        } else {
          int64_t zeroed = 0;
          e = uffd_zeropage(uffd_, addr, ps, false, &zeroed);
          if (e == -EEXIST) e = 0;  // placed meanwhile; the write retries
          missing_faults_++;
        }
        if (e) failures_++, last_errno_ = -e;
        // marked once writable, before the writer runs (see the invariant above)
        if (Tracked* t = find(addr)) {
          uint32_t page = (uint32_t)((addr - t->m->addr()) / ps);
          __atomic_fetch_or(&t->dirty[page >> 5], 1u << (page & 31), __ATOMIC_ACQ_REL);
        }
        // Whatever went wrong, the faulting thread must not wait forever: it retries, and faults again if need be.
        // Last: in the idle class the woken writer preempts this thread here (all the fault's work is done by then).
        (void)uffd_wake(uffd_, addr, ps);
      }
      // after the wake-ups, off the writers' path: on to the last writer's CPU (at most once a millisecond)
      if (follow_ && writer > 0 && now_us() - checked_us >= 1000) {
        checked_us = now_us();
        int cpu = thread_last_cpu(writer, &stat_fd, &stat_tid);
        if (cpu >= 0 && cpu != writer_cpu_.load()) {
          cpu_set_t set;
          CPU_ZERO(&set);
          CPU_SET(cpu, &set);
          if (sched_setaffinity(0, sizeof set, &set) == 0) writer_cpu_ = cpu, cpu_moves_++;
          else follow_ = false, writer_cpu_ = -1;  // not allowed there (a cpuset): stay where the scheduler puts it
        }
      }
    }
    if (stat_fd >= 0) ::close(stat_fd);
  }

  // The guard of the idle-class fault thread (see the top of this file): every GUARD_TICK_MS, a fault that was
  // pending at the last tick too while the fault thread resolved none means other work on its CPU starves it; the
  // thread then runs in the normal class for a while (100 ms, doubling each time up to 3.2 s), and goes back after.
  // After GUARD_QUIET_TICKS ticks without a fault it stops ticking and waits for the next fault instead (a service
  // that writes little, or none after the hand-off, while the tracker lives on to the agent's exit).
  void guard() {
    static constexpr int GUARD_TICK_MS = 2, GUARD_QUIET_TICKS = 50;
    uint64_t last_done = UINT64_MAX;
    bool was_pending = false;
    int quiet_ticks = 0;
    double normal_until_us = 0, backoff_us = 100e3;
    for (;;) {
      bool quiet = idle_now_ && quiet_ticks >= GUARD_QUIET_TICKS;
      pollfd p[2] = {{stop_fd_, POLLIN, 0}, {uffd_, POLLIN, 0}};
      int r = poll(p, quiet ? 2 : 1, quiet ? -1 : GUARD_TICK_MS);
      if (r < 0 && errno == EINTR) continue;
      if (r < 0 || p[0].revents) return;
      if (quiet) {  // a fault came: tick again
        quiet_ticks = 0;
        continue;
      }
      double now = now_us();
      if (!idle_now_) {
        if (normal_until_us && now >= normal_until_us && set_class(SCHED_IDLE)) normal_until_us = 0;
        continue;
      }
      pollfd f = {uffd_, POLLIN, 0};
      bool pending = poll(&f, 1, 0) > 0 && (f.revents & POLLIN);
      uint64_t done = wp_faults_.load() + missing_faults_.load();
      if (pending && was_pending && done == last_done && set_class(SCHED_OTHER)) {
        starved_++;
        normal_until_us = now + backoff_us;
        backoff_us = std::min(backoff_us * 2, 3.2e6);
        pending = false;
      }
      quiet_ticks = !pending && done == last_done ? quiet_ticks + 1 : 0;
      was_pending = pending;
      last_done = done;
    }
  }

  // The fault thread's scheduling class (SCHED_IDLE or SCHED_OTHER; its nice value is kept); false if refused.
  bool set_class(int policy) {
    sched_param sp{};
    if (sched_setscheduler(fault_tid_, policy, &sp) != 0) return false;
    idle_now_ = policy == SCHED_IDLE;
    return true;
  }

  Tracked* find(uintptr_t addr) {
    for (auto& r : regions_)
      if (addr >= r.m->addr() && addr < r.m->addr() + r.m->size) return &r;
    return nullptr;
  }

  Tracked& arg_tracked(const Napi::CallbackInfo& info) {
    if (uffd_ < 0) throw lib_error(info.Env(), "ERR_UFFD_CLOSED", "this tracker is closed");
    uint32_t id = (uint32_t)arg_index(info, 0, "regionId", 4294967295.0);
    for (auto& r : regions_)
      if (r.m->id == id) return r;
    throw Napi::RangeError::New(info.Env(), "region " + std::to_string(id) + " is not tracked here");
  }

  // Runs taken by a collect are re-protected in spans that bridge gaps of up to this many pages. An ioctl costs
  // ~20 us here (its TLB flush interrupts the writer's CPU) and a page of a span ~0.16 us, so one span is cheaper
  // than two ioctls across a gap up to ~125 pages. The pages of a gap are protected already, or were written after
  // the take (they are in the next bitmap) and fault once more. bench:native, 256 MiB guest: a collect of ~1000
  // random pages 10-11 ms against 16-19, of ~3800 pages 11-18 ms against 69-71.
  static constexpr uint32_t REPROTECT_MERGE_GAP_PAGES = 128;

  // collect(regionId) -> runs [first, count]* written since the last collect, re-protected
  Napi::Value Collect(const Napi::CallbackInfo& info) {
    Tracked& t = arg_tracked(info);
    const size_t ps = page_size();
    auto runs = bit_runs(t.dirty, t.pages, true);  // taken before anything is re-protected (see the invariant)
    AwayFromCpu away(runs.empty() ? -1 : writer_cpu_.load());  // see the top of this file
    if (away.moved()) collects_moved_++;
    for (size_t k = 0; k < runs.size();) {
      uint32_t first = runs[k], end = runs[k] + runs[k + 1];
      for (k += 2; k < runs.size() && runs[k] - end <= REPROTECT_MERGE_GAP_PAGES; k += 2) end = runs[k] + runs[k + 1];
      int e = uffd_writeprotect(uffd_, t.m->addr() + first * ps, (size_t)(end - first) * ps, true, true);
      if (e) throw sys_error(info.Env(), e, "ioctl(UFFDIO_WRITEPROTECT)");
    }
    return to_js(info.Env(), runs);
  }

  // peek(regionId) -> runs written since the last collect, left as they are (the hand-off's final scan)
  Napi::Value Peek(const Napi::CallbackInfo& info) {
    Tracked& t = arg_tracked(info);
    return to_js(info.Env(), bit_runs(t.dirty, t.pages, false));
  }

  // present(regionId) -> runs of pages that hold memory (present or swapped), from /proc/self/pagemap
  Napi::Value Present(const Napi::CallbackInfo& info) {
    Tracked& t = arg_tracked(info);
    std::vector<uint32_t> runs;
    int e = pagemap_present(t.m->addr(), t.pages, &runs);
    if (e) throw sys_error(info.Env(), e, "pread(/proc/self/pagemap)");
    return to_js(info.Env(), runs);
  }

  Napi::Value Close(const Napi::CallbackInfo& info) {
    Shutdown();
    return info.Env().Undefined();
  }

  // stats -> { wpFaults, missingFaults, failures, lastErrno, cpuMs, cpuMoves (the thread moved to a writer's CPU),
  //            idleClass (the thread runs in SCHED_IDLE now), starved (times the guard moved it back to the normal class),
  //            collectsMoved (collects that re-protected off the writer's CPU) }
  Napi::Value Stats(const Napi::CallbackInfo& info) {
    auto env = info.Env();
    auto o = Napi::Object::New(env);
    o.Set("wpFaults", Napi::Number::New(env, (double)wp_faults_.load()));
    o.Set("missingFaults", Napi::Number::New(env, (double)missing_faults_.load()));
    o.Set("failures", Napi::Number::New(env, (double)failures_.load()));
    o.Set("lastErrno", Napi::Number::New(env, (double)last_errno_.load()));
    o.Set("cpuMs", Napi::Number::New(env, thread_cpu_ms(thread_)));
    o.Set("cpuMoves", Napi::Number::New(env, (double)cpu_moves_.load()));
    o.Set("idleClass", Napi::Boolean::New(env, idle_now_.load()));
    o.Set("starved", Napi::Number::New(env, (double)starved_.load()));
    o.Set("collectsMoved", Napi::Number::New(env, (double)collects_moved_.load()));
    return o;
  }

  std::vector<Tracked> regions_;
  std::thread thread_, guard_;
  pid_t fault_tid_ = 0;                // the fault thread's id, set before its constructor returns
  std::atomic<bool> idle_now_{false};  // the fault thread runs in SCHED_IDLE (the guard alone changes it after start)
  std::atomic<uint64_t> starved_{0};   // times the guard moved it back to the normal class
  int uffd_ = -1, stop_fd_ = -1;
  std::atomic<uint64_t> wp_faults_{0}, missing_faults_{0}, failures_{0}, cpu_moves_{0};
  bool follow_ = false;  // written before the thread starts; the thread alone clears it
  std::atomic<int> last_errno_{0};
  std::atomic<int> writer_cpu_{-1};  // the CPU this thread follows the writer on (-1: not there yet, or not following)
  std::atomic<uint64_t> collects_moved_{0};
};

}  // namespace

void init_wp_tracker_bindings(Napi::Env env, Napi::Object exports) {
  exports.Set("SyncWpTracker", SyncWpTracker::Define(env));
  // syncWpIdleClass() -> whether uffdm-wp can run in SCHED_IDLE here (this process may take a thread out of it again)
  exports.Set("syncWpIdleClass", Napi::Function::New(env, [](const Napi::CallbackInfo& info) -> Napi::Value {
                return Napi::Boolean::New(info.Env(), idle_class_reversible());
              }));
}

}  // namespace uffdm
