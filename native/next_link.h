// The connection a JS call hands to a native thread (attach()), which the thread takes over at its next turn: the
// bulk reader's and the demand client's. The newer one wins (one offered and not taken yet is closed). Each gets an
// id, which the thread's CLOSED event for it carries: JS tells the end of a connection the thread had left for the
// next one (late, that link broke already) from the current one's.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <memory>

#include "records.h"

namespace uffdm {

struct NextLink {
  // Under the owner's lock (JS's side): fd (-1: none, the link broke) and how it is opened come next; returns its id.
  uint32_t offer(int fd_in, std::unique_ptr<records::Link> link_in) {
    if (fd >= 0) close(fd);
    fd = fd_in;
    link = std::move(link_in);
    pending = true;
    return id = ++offers;
  }

  // Under the owner's lock (the thread's side): the connection offered, if one was (its fd is the taker's now; a
  // plain link where none was given), and its id.
  bool take(int* fd_out, std::unique_ptr<records::Link>* link_out, uint32_t* id_out) {
    if (!pending) return false;
    pending = false;
    *fd_out = fd;
    fd = -1;
    *link_out = link ? std::move(link) : std::make_unique<records::Link>();
    *id_out = id;
    return true;
  }

  ~NextLink() {
    if (fd >= 0) close(fd);
  }

 private:
  int fd = -1;
  std::unique_ptr<records::Link> link;
  bool pending = false;
  uint32_t offers = 0, id = 0;  // (the first connection, the constructor's, is 0)
};

}  // namespace uffdm
