// Which userfaultfd holds each region's missing-page registration (a destination's, between its hand-off and
// settling), so that a thread other than the agent's can place zero pages through it: the service's own thread,
// in free(), without waiting for the agent's loop (see zero_fill_registered). Every descriptor that registered a
// region goes through registry_replace() before it is closed, so that no call here uses a closed or reused one.
#pragma once
#include <cstddef>
#include <cstdint>

namespace uffdm {

void registry_set(uint32_t region_id, int fd);
// Region registrations held by fd now go through replacement (a held duplicate), or are forgotten (-1).
void registry_replace(int fd, int replacement);
void registry_drop(uint32_t region_id, int fd);
// Drops [addr, addr+len) of the region and places zero pages there through the userfaultfd that holds its
// registration: the range reads zero at once and a touch never faults. Pages another thread placed between the
// two steps are dropped and filled again. Returns the pages filled, -1 when no userfaultfd holds the region (the
// caller discards instead), or -errno.
int64_t zero_fill_registered(uint32_t region_id, uintptr_t addr, size_t len);

}  // namespace uffdm
