// What the two ends of the demand connection share (demand_server.cc on the source, demand_client.cc on the
// destination): the wire format (docs/protocol.md) and the kinds of the events their threads hand to JS. Frames
// are u32 length (type + payload, big-endian) | u8 type | payload. The destination sends PAGE_REQUEST (30):
// u8 kind | u32 region | (u32 first, u32 count)*, and the source answers PAGES (20): u32 region | u32 first |
// u32 count | count pages. Nothing else travels there. Included by those two files only (bulk.cc has event
// kinds of its own under the same names).
#pragma once
#include <napi.h>

#include <cstddef>
#include <cstdint>

namespace uffdm {
namespace demand_wire {

constexpr uint8_t kMsgPages = 20;
constexpr uint8_t kMsgPageRequest = 30;
constexpr uint8_t kKindFault = 1;
// Pages per reply frame: what one installs at a time (and what the staging buffer holds).
constexpr uint32_t kFramePages = 64;
// A request frame carries at most this many runs (a batch of faults read at once).
constexpr uint32_t kMaxRequestRuns = 4096;

// Event kinds, in the order of src/agent/demand.ts.
enum : int {
  kEvFault = 1,      // source: (region, first page of a requested run)
  kEvSent = 2,       // source: (region, first, count) sent on demand
  kEvArrived = 3,    // destination: (region, first, count) installed here (c: pages newly marked received)
  kEvLatency = 4,    // destination: (fault to install, us; b: 0 = installed from this thread's reply, 1 = by the push)
  kEvZeroFault = 5,  // destination: a fault on a page that is local (known zero): zero-filled here
  kEvNetFault = 6,   // destination: (region, page, pages asked: 1 + read-ahead) asked of the source
  kEvClosed = 7,     // either: the connection ended (a: errno, 0 = end of stream; b: how, records.h: 1 = protocol violation, 2, 3 = a sealed record failed; c, destination: the connection's id, attach()'s)
  kEvCpu = 8,        // either, as the thread ends: its CPU time (user + system), ms
};

// Reads one frame at a time from a non-blocking socket into a header buffer and a payload buffer.
struct FrameReader {
  uint8_t hdr[17], next[5];
  size_t hdr_have = 0, body_have = 0, body_need = 0, next_have = 0;
  bool sized = false;  // the frame's first five bytes were read and checked
};

// The JS classes (their constructors start the threads).
Napi::Function define_demand_server(Napi::Env env);
Napi::Function define_demand_client(Napi::Env env);

}  // namespace demand_wire
}  // namespace uffdm
