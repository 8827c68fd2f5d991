/* Keeps memory warm for a benchmark's whole run (bench/lib/warm.mjs starts it).
 *
 * This VM backs guest memory lazily and takes it back: virtio_balloon free page
 * reporting hands every free, whole 2 MiB block (order 9) back to the host
 * about 2 s after it is freed, and the next touch of that memory costs ~10 us
 * a page instead of ~2.5. "Touch and free" before a benchmark is therefore
 * undone within seconds. This program touches MIB MiB once and then frees all
 * but one 4 KiB page of every 64: no freed 2 MiB block is whole again, so none
 * is reported, and the freed pieces (orders 0-5) are the first ones the page
 * allocator hands out to the processes that run next (ours and the C
 * references alike). It holds 1/64 of MIB until its parent dies.
 *
 * usage: warm_keeper MIB READY_FILE  (writes READY_FILE when warm; exits with its parent)
 */
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <unistd.h>

#define PAGE 4096ul
#define KEEP_EVERY (64 * PAGE)

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: warm_keeper MIB READY_FILE\n");
        return 2;
    }
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() == 1) return 0; /* the parent is already gone */
    size_t len = strtoull(argv[1], NULL, 10) << 20;
    uint8_t *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
        perror("warm_keeper: mmap");
        return 1;
    }
    /* 4 KiB pages: a huge page partly freed is not given back until the kernel splits it under pressure */
    madvise(p, len, MADV_NOHUGEPAGE);
    for (size_t off = 0; off < len; off += PAGE) ((volatile uint8_t *)p)[off] = 1;
    for (size_t off = 0; off + PAGE < len; off += KEEP_EVERY) {
        size_t n = len - off - PAGE < KEEP_EVERY - PAGE ? len - off - PAGE : KEEP_EVERY - PAGE;
        madvise(p + off + PAGE, n, MADV_DONTNEED);
    }
    int fd = open(argv[2], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || write(fd, "ready\n", 6) != 6) {
        perror("warm_keeper: ready file");
        return 1;
    }
    close(fd);
    for (;;) pause();
}
