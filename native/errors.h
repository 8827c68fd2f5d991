// Every failing syscall becomes one JS error class (handed to the addon at
// init, better-sqlite3 style) with code, errno, syscall and a hint that says
// what to do.
#pragma once
#include <napi.h>

#include <string>

namespace uffdm {

void errors_init(Napi::Env env, Napi::Function error_class);
// neg_errno: -errno as returned by the uffd_* / pagemap functions.
Napi::Error sys_error(Napi::Env env, int neg_errno, const char* syscall, const std::string& context = "");
const char* errno_code(int err);
// An error of the library's class with a stable code (no errno), e.g. ERR_UFFD_CLOSED.
Napi::Error lib_error(Napi::Env env, const char* code, const std::string& message);

}  // namespace uffdm
