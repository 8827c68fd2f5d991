// JS surface of regions: create/open/release views, discard, PAGEMAP_SCAN,
// zero-page detection.
#include <errno.h>
#include <sys/mman.h>

#include <map>
#include <tuple>
#include <mutex>
#include <vector>

#include "args.h"
#include "discard.h"
#include "bindings.h"
#include "errors.h"
#include "page_maps.h"
#include "pagemap.h"
#include "region.h"
#include "uffd_registry.h"

namespace uffdm {

namespace {

constexpr uint64_t kMaxRegionBytes = 4ull << 30;

// One per ArrayBuffer: holds the mapping alive while JS can reach the memory.
struct View {
  std::shared_ptr<Mapping> mapping;
};
std::mutex g_views_mu;
// (env, data pointer) -> view, so that release(buffer) finds its holder.
std::map<std::pair<napi_env, void*>, View*> g_views;

Napi::ArrayBuffer make_view(Napi::Env env, std::shared_ptr<Mapping> m) {
  auto* view = new View{m};
  {
    std::lock_guard<std::mutex> lock(g_views_mu);
    auto key = std::make_pair((napi_env)env, (void*)m->base);
    auto it = g_views.find(key);
    if (it != g_views.end()) {
      delete view;
      throw Napi::Error::New(env, "region " + std::to_string(m->id) + " already has a view in this thread; reuse it");
    }
    g_views[key] = view;
  }
  return Napi::ArrayBuffer::New(
      env, m->base, m->size,
      [](Napi::Env e, void* data, View* v) {
        std::lock_guard<std::mutex> lock(g_views_mu);
        auto it = g_views.find(std::make_pair((napi_env)e, data));
        if (it != g_views.end() && it->second == v) g_views.erase(it);
        delete v;
      },
      view);
}

Napi::Value RegionCreate(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  const double ps = (double)page_size();
  uint64_t bytes = arg_index(info, 0, "bytes", 1ull << 46);
  if (bytes == 0 || bytes % (uint64_t)ps)
    throw Napi::RangeError::New(env, "expected a region size that is a positive multiple of " +
                                         std::to_string((uint64_t)ps) + ", got " + std::to_string(bytes));
  // Node 20 refuses a larger external ArrayBuffer, after running its
  // finalizer: check first (a larger guest uses several regions).
  if (bytes > kMaxRegionBytes)
    throw Napi::RangeError::New(env, "expected a region size of at most " + std::to_string(kMaxRegionBytes) +
                                         " bytes (4 GiB; use several regions for more), got " + std::to_string(bytes));
  int err = 0;
  auto m = region_create(bytes, &err);
  if (!m) throw sys_error(env, err, "mmap", std::to_string(bytes) + " bytes");
  auto out = Napi::Object::New(env);
  out.Set("id", Napi::Number::New(env, m->id));
  out.Set("buffer", make_view(env, m));
  return out;
}

Napi::Value RegionOpen(const Napi::CallbackInfo& info) {
  auto m = arg_region(info, 0);
  return make_view(info.Env(), m);
}

// Detaches this thread's view and forgets the id; the memory goes when the
// last view in any thread goes, so a worker that still holds one is safe.
Napi::Value RegionRelease(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  if (info.Length() < 1 || !info[0].IsArrayBuffer()) throw Napi::TypeError::New(env, "expected an ArrayBuffer");
  auto ab = info[0].As<Napi::ArrayBuffer>();
  void* data = ab.Data();
  std::shared_ptr<Mapping> dropped;
  {
    std::lock_guard<std::mutex> lock(g_views_mu);
    auto it = g_views.find(std::make_pair((napi_env)env, data));
    if (it == g_views.end()) return Napi::Boolean::New(env, false);
    dropped = std::move(it->second->mapping);
    g_views.erase(it);
  }
  region_forget(dropped->id);
  ab.Detach();
  dropped.reset();  // unmaps here unless another thread still has a view
  return Napi::Boolean::New(env, true);
}

Napi::Value Discard(const Napi::CallbackInfo& info) {
  auto m = arg_region(info, 0);
  uint64_t off = arg_index(info, 1, "offset", 1ull << 46), len = arg_index(info, 2, "length", 1ull << 46);
  check_range(info, *m, off, len);
  if (madvise(m->base + off, len, MADV_DONTNEED)) throw sys_error(info.Env(), -errno, "madvise(MADV_DONTNEED)");
  return info.Env().Undefined();
}

// discardRegistered(regionId, offset, length) -> pages zero-filled through the userfaultfd that holds the region's
// registration (a destination in post-copy: the range reads zero now, and a touch never waits for the network); -1
// when none holds it (a plain discard() is right then); -errno when a call failed (not thrown: the caller's free()
// goes on as before this existed, the agent zero-fills what is still missing).
Napi::Value DiscardRegistered(const Napi::CallbackInfo& info) {
  auto m = arg_region(info, 0);
  uint64_t off = arg_index(info, 1, "offset", 1ull << 46), len = arg_index(info, 2, "length", 1ull << 46);
  check_range(info, *m, off, len);
  return Napi::Number::New(info.Env(), (double)zero_fill_registered(m->id, m->addr() + off, len));
}

// discardRuns(regionId, runs: Uint32Array of (firstPage, pageCount) pairs) -> system calls made. All runs are
// checked before any is dropped; one process_madvise call takes up to IOV_MAX of them (see discard.h).
Napi::Value DiscardRuns(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  auto m = arg_region(info, 0);
  if (info.Length() < 2 || !info[1].IsTypedArray() || info[1].As<Napi::TypedArray>().TypedArrayType() != napi_uint32_array)
    throw Napi::TypeError::New(env, "expected runs to be a Uint32Array of (firstPage, pageCount) pairs");
  auto runs = info[1].As<Napi::Uint32Array>();
  if (runs.ElementLength() % 2) throw Napi::TypeError::New(env, "expected runs to hold (firstPage, pageCount) pairs");
  const size_t ps = page_size(), total = m->size / ps;
  std::vector<iovec> ranges;
  ranges.reserve(runs.ElementLength() / 2);
  for (size_t k = 0; k < runs.ElementLength(); k += 2) {
    uint64_t first = runs[k], count = runs[k + 1];
    if (count == 0 || first >= total || count > total - first)
      throw Napi::RangeError::New(env, "run " + std::to_string(first) + "+" + std::to_string(count) + " is outside the region");
    ranges.push_back({m->base + first * ps, (size_t)(count * ps)});
  }
  size_t syscalls = 0;
  int e = discard_ranges(ranges, &syscalls);
  if (e) throw sys_error(env, e, "madvise(MADV_DONTNEED)");
  return Napi::Number::New(env, (double)syscalls);
}

// (regionId, firstPage, pageCount) at args 0..2, inside the region.
std::tuple<std::shared_ptr<Mapping>, uint64_t, uint64_t> page_range_args(const Napi::CallbackInfo& info) {
  auto m = arg_region(info, 0);
  const uint64_t total = m->size / page_size();
  uint64_t first = arg_index(info, 1, "firstPage", (double)total);
  uint64_t count = arg_index(info, 2, "pageCount", (double)(total - first));
  return {m, first, count};
}

// pagemapScan(regionId, firstPage, pageCount, flags, categoryMask, categoryInverted, categoryAnyof, returnMask,
//             threads = 1) -> Uint32Array of [firstPage, pageCount] runs. threads > 1: the walk split over that many
// threads where each gets enough memory (pagemap_scan_parallel()).

Napi::Value PagemapScan(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  auto [m, first, count] = page_range_args(info);
  ScanSpec spec;
  spec.flags = arg_index(info, 3, "flags", 3);
  spec.category_mask = arg_index(info, 4, "categoryMask", 255);
  spec.category_inverted = arg_index(info, 5, "categoryInverted", 255);
  spec.category_anyof = arg_index(info, 6, "categoryAnyof", 255);
  spec.return_mask = arg_index(info, 7, "returnMask", 255);
  if (spec.return_mask == 0) spec.return_mask = spec.category_mask | spec.category_anyof;
  if (count == 0) return Napi::Uint32Array::New(env, 0);
  thread_local std::vector<uint32_t> runs;
  runs.clear();
  unsigned threads = info.Length() > 8 && !info[8].IsUndefined() ? (unsigned)arg_index(info, 8, "threads", 64) : 1;
  int r = pagemap_scan_parallel(m->addr(), first, count, spec, &runs, threads);
  if (r) throw sys_error(env, r, "ioctl(PAGEMAP_SCAN)");
  auto out = Napi::Uint32Array::New(env, runs.size());
  std::copy(runs.begin(), runs.end(), out.Data());
  return out;
}

// pagemapProtectAll(regionId, firstPage, pageCount): every page of the range write-protected, present or not
// (pagemap_protect_all()).
Napi::Value PagemapProtectAll(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  auto [m, first, count] = page_range_args(info);
  int r = pagemap_protect_all(m->addr() + first * page_size(), count);
  if (r) throw sys_error(env, r, "ioctl(PAGEMAP_SCAN)");
  return env.Undefined();
}

// zeroPages(regionId, firstPage, pageCount, out: Uint8Array) -> number of zero pages;
// out[i] = 1 when page first+i is all zeros. Reads the pages: source side only.
Napi::Value ZeroPages(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  auto [m, first, count] = page_range_args(info);
  const size_t ps = page_size();
  if (info.Length() < 4 || !info[3].IsTypedArray() ||
      info[3].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array)
    throw Napi::TypeError::New(env, "expected out to be a Uint8Array");
  auto out = info[3].As<Napi::Uint8Array>();
  if (out.ElementLength() < count)
    throw Napi::RangeError::New(env, "expected out to hold at least " + std::to_string(count) + " bytes");
  uint32_t zeros = 0;
  for (uint64_t i = 0; i < count; i++) {
    bool z = page_is_zero(m->base + (first + i) * ps, ps);
    out[i] = z;
    zeros += z;
  }
  return Napi::Number::New(env, zeros);
}

}  // namespace

void init_region_bindings(Napi::Env env, Napi::Object exports) {
  exports.Set("regionCreate", Napi::Function::New(env, RegionCreate));
  exports.Set("regionOpen", Napi::Function::New(env, RegionOpen));
  exports.Set("regionRelease", Napi::Function::New(env, RegionRelease));
  exports.Set("discard", Napi::Function::New(env, Discard));
  exports.Set("discardRegistered", Napi::Function::New(env, DiscardRegistered));
  exports.Set("discardRuns", Napi::Function::New(env, DiscardRuns));
  exports.Set("pagemapScan", Napi::Function::New(env, PagemapScan));
  exports.Set("pagemapProtectAll", Napi::Function::New(env, PagemapProtectAll));
  exports.Set("zeroPages", Napi::Function::New(env, ZeroPages));
}

}  // namespace uffdm
