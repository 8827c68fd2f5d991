{
  "targets": [
    {
      "target_name": "uffd_migrate",
      "sources": [
        "native/addon.cc",
        "native/bulk.cc",
        "native/bulk_writer.cc",
        "native/demand.cc",
        "native/demand_client.cc",
        "native/demand_server.cc",
        "native/discard.cc",
        "native/errors.cc",
        "native/exit_watch.cc",
        "native/fault_reader.cc",
        "native/pagemap.cc",
        "native/region.cc",
        "native/region_binding.cc",
        "native/records.cc",
        "native/relay.cc",
        "native/socket_binding.cc",
        "native/thread_binding.cc",
        "native/uffd.cc",
        "native/uffd_binding.cc",
        "native/uffd_registry.cc",
        "native/wp_tracker.cc"
      ],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      # NODE_API_SWALLOW_UNTHROWABLE_EXCEPTIONS: an addon call that fails while its worker is being terminated
      # (guest.close() during a batch) returns quietly; without it the error cannot be thrown into JS and the C++
      # exception aborts the whole process (seen in CI; test/native-teardown.test.ts)
      "defines": ["NAPI_VERSION=8", "NODE_ADDON_API_DISABLE_DEPRECATED", "NODE_API_SWALLOW_UNTHROWABLE_EXCEPTIONS"],
      "cflags!": ["-fno-exceptions"],
      "cflags_cc!": ["-fno-exceptions"],
      "cflags_cc": ["-std=c++17", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"],
      "conditions": [["OS!='linux'", {"type": "none"}]]
    }
  ]
}
