/* C twin of bench:bulk's sparse layout, end to end over loopback TCP: what the
 * page-store's memory (every 8th page never written) costs the best plain C
 * receiver, against the same program moving every page. A source process
 * sends 1 GiB (MIB) of region, a destination thread receives and installs it
 * into a registered MISSING region:
 *   dense          every page: 1 MiB reads, one UFFDIO_COPY of 256 pages each
 *                  (the layout of 7.bulk4g.copy)
 *   sparse         the 7 data pages of each 8 (no headers: the layout is known
 *                  to both sides), read 224 pages at a time; per 7-page run one
 *                  UFFDIO_COPY, per never-written page one UFFDIO_ZEROPAGE (as
 *                  the engine installs known-zero pages before the hand-off)
 *   sparse_nozero  as sparse, the never-written pages left missing (a lower
 *                  bound: after the hand-off each would cost the service a fault)
 *   sparse_fill    as sparse, but each 224 pages are read into a 256-page buffer
 *                  whose gap pages stay zero and placed with one UFFDIO_COPY: the
 *                  call count of dense, for 1 page in 8 of real memory the source
 *                  never had (the trade the engine does not make)
 * Rates and CPU are per GiB of page data sent (7/8 of the region for the
 * sparse rows), as bench:bulk counts its rows. The source writes with writev
 * straight from its region (one iovec per run), as the engine's writer does.
 * Build: gcc -O2 -I ../shared/limits -o sparse_tcp sparse_tcp.c -lpthread
 * Output: RESULT|id|description|unit|min|median|max (see common.h). */
#include "common.h"
#include "thread_cpu.h"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/wait.h>

#define CHUNK_PAGES 256
#define RUN 7 /* data pages between two never-written ones */
#define DATA_PAGES (CHUNK_PAGES / (RUN + 1) * RUN) /* 224 per chunk */

enum { M_DENSE, M_SPARSE, M_NOZERO, M_FILL, M_COUNT };
static const char *names[M_COUNT] = {"dense", "sparse", "sparse_nozero", "sparse_fill"};
static const char *descs[M_COUNT] = {
    "every page, 1 MiB reads, UFFDIO_COPY of 256 pages",
    "7 of 8 pages sent, UFFDIO_COPY per 7-page run + UFFDIO_ZEROPAGE per never-written page",
    "7 of 8 pages sent, UFFDIO_COPY per 7-page run, never-written pages left missing",
    "7 of 8 pages sent, read into a 256-page buffer with zero gaps, one UFFDIO_COPY (1 page in 8 becomes real memory)",
};

static size_t g_len;
static struct sockaddr_in g_addr;

static void full_io(int fd, struct iovec *iov, int n, int wr)
{
    while (n > 0) {
        ssize_t k = wr ? writev(fd, iov, n) : readv(fd, iov, n);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) DIE(wr ? "writev" : "readv (eof?)");
        while (n > 0 && (size_t)k >= iov->iov_len) k -= iov->iov_len, iov++, n--;
        if (n > 0) iov->iov_base = (uint8_t *)iov->iov_base + k, iov->iov_len -= k;
    }
}

static void source_main(int ls)
{
    uint8_t *mem = map_anon_aligned(g_len, 0);
    for (size_t pg = 0; pg < g_len / PAGE; pg++) ((uint64_t *)(mem + pg * PAGE))[64] = pg + 1;
    for (;;) {
        int fd = accept(ls, NULL, NULL);
        if (fd < 0) DIE("accept");
        uint64_t mode;
        struct iovec c = {&mode, 8};
        full_io(fd, &c, 1, 0);
        if (mode == (uint64_t)-1) break;
        double c0 = thread_cpu_s();
        struct iovec iov[CHUNK_PAGES / (RUN + 1)];
        for (size_t off = 0; off < g_len; off += CHUNK_PAGES * PAGE) {
            if (mode == M_DENSE) {
                iov[0] = (struct iovec){mem + off, CHUNK_PAGES * PAGE};
                full_io(fd, iov, 1, 1);
                continue;
            }
            int n = 0;
            for (size_t p = 0; p < CHUNK_PAGES; p += RUN + 1) iov[n++] = (struct iovec){mem + off + p * PAGE, RUN * PAGE};
            full_io(fd, iov, n, 1);
        }
        double cpu = thread_cpu_s() - c0;
        c = (struct iovec){&cpu, 8};
        full_io(fd, &c, 1, 1);
        close(fd);
    }
    _exit(0);
}

static int dial(uint64_t mode)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(fd, (void *)&g_addr, sizeof g_addr)) DIE("connect");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct iovec c = {&mode, 8};
    full_io(fd, &c, 1, 1);
    return fd;
}

static void place(int uffd, uint8_t *dst, const uint8_t *src, size_t pages, int zero)
{
    if (zero) {
        struct uffdio_zeropage z = {.range = {(uintptr_t)dst, pages * PAGE}};
        if (ioctl(uffd, UFFDIO_ZEROPAGE, &z)) DIE("UFFDIO_ZEROPAGE");
    } else {
        struct uffdio_copy c = {.dst = (uintptr_t)dst, .src = (uintptr_t)src, .len = pages * PAGE};
        if (ioctl(uffd, UFFDIO_COPY, &c)) DIE("UFFDIO_COPY");
    }
}

/* one migration of the region in `mode`: seconds; *dst_cpu, *src_cpu: CPU s per GiB of data */
static double once(int mode, double *dst_cpu, double *src_cpu)
{
    int uffd = uffd_open(0, NULL);
    uint8_t *dst = map_anon_aligned(g_len, 0);
    uffd_register(uffd, dst, g_len, UFFDIO_REGISTER_MODE_MISSING);
    uint8_t *buf = map_anon_aligned(CHUNK_PAGES * PAGE, 0);
    memset(buf, 0, CHUNK_PAGES * PAGE);
    int fd = dial(mode);
    double t0 = now_ns() / 1e9, c0 = thread_cpu_s();
    struct iovec iov[CHUNK_PAGES / (RUN + 1)];
    for (size_t off = 0; off < g_len; off += CHUNK_PAGES * PAGE) {
        if (mode == M_DENSE) {
            iov[0] = (struct iovec){buf, CHUNK_PAGES * PAGE};
            full_io(fd, iov, 1, 0);
            place(uffd, dst + off, buf, CHUNK_PAGES, 0);
        } else if (mode == M_FILL) {
            int n = 0;
            for (size_t p = 0; p < CHUNK_PAGES; p += RUN + 1) iov[n++] = (struct iovec){buf + p * PAGE, RUN * PAGE};
            full_io(fd, iov, n, 0);
            place(uffd, dst + off, buf, CHUNK_PAGES, 0);
        } else {
            iov[0] = (struct iovec){buf, DATA_PAGES * PAGE};
            full_io(fd, iov, 1, 0);
            for (size_t p = 0, k = 0; p < CHUNK_PAGES; p += RUN + 1, k += RUN) {
                place(uffd, dst + off + p * PAGE, buf + k * PAGE, RUN, 0);
                if (mode == M_SPARSE) place(uffd, dst + off + (p + RUN) * PAGE, NULL, 1, 1);
            }
        }
    }
    double secs = now_ns() / 1e9 - t0, dcpu = thread_cpu_s() - c0, scpu;
    struct iovec c = {&scpu, 8};
    full_io(fd, &c, 1, 0);
    close(fd);
    for (size_t pg = 0; pg < g_len / PAGE; pg += 4099) {
        int gap = mode != M_DENSE && pg % (RUN + 1) == RUN;
        if (mode == M_NOZERO && gap) continue; /* left missing: a touch would block on the userfault */
        uint64_t want = gap ? 0 : pg + 1, got = ((uint64_t *)(dst + pg * PAGE))[64];
        if (got != want) DIE("%s: page %zu holds %lu, expected %lu", names[mode], pg, (unsigned long)got, (unsigned long)want);
    }
    munmap(buf, CHUNK_PAGES * PAGE);
    munmap(dst, g_len);
    close(uffd);
    double data_gib = (double)g_len / GiB * (mode == M_DENSE ? 1.0 : (double)RUN / (RUN + 1));
    *dst_cpu = dcpu / data_gib;
    *src_cpu = scpu / data_gib;
    return data_gib / secs;
}

int main(int argc, char **argv)
{
    parse_common_args(argc, argv);
    signal(SIGPIPE, SIG_IGN);
    g_len = (getenv("MIB") ? (size_t)atol(getenv("MIB")) : 1024) * MiB;
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    g_addr = (struct sockaddr_in){.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK), .sin_port = 0};
    if (bind(ls, (void *)&g_addr, sizeof g_addr)) DIE("bind");
    socklen_t al = sizeof g_addr;
    getsockname(ls, (void *)&g_addr, &al);
    if (listen(ls, 4)) DIE("listen");
    prewarm(2 * g_len); /* standalone runs: memory the host has backed (bench:bulk keeps more warm) */
    pid_t src = fork();
    if (src == 0) source_main(ls);
    close(ls);
    double bw[M_COUNT][64], dcpu[M_COUNT][64], scpu[M_COUNT][64];
    /* the modes interleaved inside each run: the machine's drift touches all of them alike */
    FOR_RUNS(r) {
        for (int m = 0; m < M_COUNT; m++) bw[m][r] = once(m, &dcpu[m][r], &scpu[m][r]);
    }
    for (int m = 0; m < M_COUNT; m++) {
        char id[96], d[320];
        snprintf(id, sizeof id, "bulk.sparse_tcp.%s.bw", names[m]);
        snprintf(d, sizeof d, "loopback TCP, %s: throughput per GiB of page data", descs[m]);
        report(id, d, "GiB/s", bw[m], NRUNS);
        snprintf(id, sizeof id, "bulk.sparse_tcp.%s.dst_cpu", names[m]);
        snprintf(d, sizeof d, "loopback TCP, %s: receiving thread CPU per GiB of page data", descs[m]);
        report(id, d, "s/GiB", dcpu[m], NRUNS);
        snprintf(id, sizeof id, "bulk.sparse_tcp.%s.src_cpu", names[m]);
        snprintf(d, sizeof d, "loopback TCP, %s: sending thread CPU per GiB of page data", descs[m]);
        report(id, d, "s/GiB", scpu[m], NRUNS);
    }
    close(dial((uint64_t)-1));
    waitpid(src, NULL, 0);
    return 0;
}
