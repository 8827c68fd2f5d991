// The pieces addon.cc puts together.
#pragma once
#include <napi.h>

namespace uffdm {
void init_region_bindings(Napi::Env env, Napi::Object exports);
void init_uffd_binding(Napi::Env env, Napi::Object exports);
void init_socket_bindings(Napi::Env env, Napi::Object exports);
void init_thread_bindings(Napi::Env env, Napi::Object exports);
void init_exit_watch_bindings(Napi::Env env, Napi::Object exports);
void init_demand_bindings(Napi::Env env, Napi::Object exports);
void init_relay_bindings(Napi::Env env, Napi::Object exports);
void init_bulk_bindings(Napi::Env env, Napi::Object exports);
void init_bulk_writer_bindings(Napi::Env env, Napi::Object exports);
void init_wp_tracker_bindings(Napi::Env env, Napi::Object exports);
}  // namespace uffdm
