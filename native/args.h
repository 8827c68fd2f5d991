// Argument checks shared by the bindings: every offset is validated against
// its region before any syscall, so no JS input can reach outside a region.
#pragma once
#include <napi.h>

#include <memory>
#include <string>

#include "region.h"

namespace uffdm {

inline double arg_number(const Napi::CallbackInfo& info, size_t i, const char* name) {
  if (info.Length() <= i || !info[i].IsNumber())
    throw Napi::TypeError::New(info.Env(), std::string("expected ") + name + " to be a number");
  return info[i].As<Napi::Number>().DoubleValue();
}

// A boolean, or the fallback when absent or undefined; anything else is a TypeError naming it (a caller's
// mistake, e.g. 'false' or 0, must not read as a choice).
inline bool arg_bool(const Napi::CallbackInfo& info, size_t i, const char* name, bool fallback) {
  if (info.Length() <= i || info[i].IsUndefined()) return fallback;
  if (!info[i].IsBoolean()) throw Napi::TypeError::New(info.Env(), std::string("expected ") + name + ": boolean");
  return info[i].As<Napi::Boolean>().Value();
}

// A non-negative integer no larger than limit.
inline uint64_t arg_index(const Napi::CallbackInfo& info, size_t i, const char* name, double limit) {
  double v = arg_number(info, i, name);
  if (!(v >= 0) || v != (double)(uint64_t)v || v > limit)
    throw Napi::RangeError::New(info.Env(), std::string("expected ") + name + " to be an integer in [0, " +
                                                std::to_string((uint64_t)limit) + "], got " + info[i].ToString().Utf8Value());
  return (uint64_t)v;
}

inline std::shared_ptr<Mapping> arg_region(const Napi::CallbackInfo& info, size_t i) {
  uint64_t id = arg_index(info, i, "regionId", 4294967295.0);
  auto m = region_find((uint32_t)id);
  if (!m) {
    auto err = Napi::Error::New(info.Env(), "region " + std::to_string(id) + " does not exist or was released");
    err.Set("code", "ERR_REGION_RELEASED");
    throw err;
  }
  return m;
}

// [offset, offset+length) page aligned and inside the region.
inline void check_range(const Napi::CallbackInfo& info, const Mapping& m, uint64_t offset, uint64_t length) {
  const uint64_t ps = page_size();
  if (offset % ps || offset >= m.size)
    throw Napi::RangeError::New(info.Env(), "expected a page-aligned offset below " + std::to_string(m.size) +
                                                ", got " + std::to_string(offset));
  if (length == 0 || length % ps || length > m.size - offset)
    throw Napi::RangeError::New(info.Env(), "expected a page-multiple length of at most " +
                                                std::to_string(m.size - offset) + " bytes at offset " +
                                                std::to_string(offset) + ", got " + std::to_string(length));
}

}  // namespace uffdm
