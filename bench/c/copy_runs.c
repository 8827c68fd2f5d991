/* C twin of bench:bulk's two memory layouts, install only (no socket): the
 * cost on the receiving side of placing 1 GiB with UFFDIO_COPY into a
 * missing userfaultfd region
 *   run256  256 pages a call, every page (the layout of ../shared/limits
 *           postcopy-bulk's 7.bulk4g.copy, and of bench:bulk's dense guest)
 *   run7    7 pages a call, every 8th page left out (the page-store's layout:
 *           one UFFDIO_COPY per run between never-written pages)
 * CPU seconds of the installing thread per GiB placed, min/median/max over
 * NRUNS runs. The difference is what the sparse layout adds per GiB before any
 * byte crosses a socket: a fixed cost per call (the mm lock, the VMA lookup,
 * the wake-up check).
 * Build: gcc -O2 -I ../shared/limits -o copy_runs copy_runs.c -lpthread
 * Output: RESULT|id|description|unit|min|median|max (see common.h). */
#include "common.h"
#include "thread_cpu.h"

/* places [0, len) in runs of `run` pages with `gap` pages left out after each; returns CPU s per GiB placed */
static double place(size_t len, size_t run, size_t gap, const uint8_t *src)
{
    int uffd = uffd_open(0, NULL);
    uint8_t *a = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (a == MAP_FAILED) DIE("mmap");
    struct uffdio_register reg = {.range = {(uintptr_t)a, len}, .mode = UFFDIO_REGISTER_MODE_MISSING};
    if (ioctl(uffd, UFFDIO_REGISTER, &reg)) DIE("UFFDIO_REGISTER");
    size_t pages = len / PAGE, placed = 0;
    double t0 = thread_cpu_s();
    for (size_t p = 0; p + run <= pages; p += run + gap) {
        struct uffdio_copy c = {.dst = (uintptr_t)(a + p * PAGE), .src = (uintptr_t)src, .len = run * PAGE};
        if (ioctl(uffd, UFFDIO_COPY, &c)) DIE("UFFDIO_COPY");
        placed += run;
    }
    double s = thread_cpu_s() - t0;
    munmap(a, len);
    close(uffd);
    return s / ((double)placed * PAGE / GiB);
}

int main(int argc, char **argv)
{
    parse_common_args(argc, argv);
    size_t len = getenv("MIB") ? (size_t)atol(getenv("MIB")) * MiB : GiB;
    uint8_t *src = aligned_alloc(PAGE, 256 * PAGE);
    memset(src, 7, 256 * PAGE);
    double r256[64], r7[64];
    FOR_RUNS(r) {
        r256[r] = place(len, 256, 0, src);
        r7[r] = place(len, 7, 1, src);
    }
    report("bulk.copy_runs.run256.cpu", "UFFDIO_COPY 256 pages a call, every page: installing thread CPU per GiB placed", "s/GiB", r256, NRUNS);
    report("bulk.copy_runs.run7.cpu", "UFFDIO_COPY 7 pages a call, every 8th page left out: installing thread CPU per GiB placed", "s/GiB", r7, NRUNS);
    return 0;
}
