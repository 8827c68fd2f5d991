// Module init only.
#include <napi.h>

#include "bindings.h"
#include "errors.h"
#include "region.h"

namespace uffdm {

static Napi::Value Init(const Napi::CallbackInfo& info) {
  if (info.Length() < 1 || !info[0].IsFunction()) throw Napi::TypeError::New(info.Env(), "expected the error class");
  errors_init(info.Env(), info[0].As<Napi::Function>());
  return info.Env().Undefined();
}

Napi::Object InitModule(Napi::Env env, Napi::Object exports) {
  exports.Set("init", Napi::Function::New(env, Init));
  exports.Set("pageSize", Napi::Number::New(env, (double)page_size()));
  init_region_bindings(env, exports);
  init_uffd_binding(env, exports);
  init_socket_bindings(env, exports);
  init_thread_bindings(env, exports);
  init_exit_watch_bindings(env, exports);
  init_demand_bindings(env, exports);
  init_relay_bindings(env, exports);
  init_bulk_bindings(env, exports);
  init_bulk_writer_bindings(env, exports);
  init_wp_tracker_bindings(env, exports);
  // the native threads seal and open the records of encrypted migrations themselves (records.h)
  exports.Set("nativeSealing", Napi::Boolean::New(env, true));
  return exports;
}

}  // namespace uffdm

static Napi::Object Init(Napi::Env env, Napi::Object exports) { return uffdm::InitModule(env, exports); }
NODE_API_MODULE(uffd_migrate, Init)
