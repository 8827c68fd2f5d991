/* How fast can the source write-protect a region before round 0? The
 * wp-async tracker registers each region for WP (WP_ASYNC + WP_UNPOPULATED)
 * and must then protect every page, present or not, before round 0 reads
 * it. Three ways, each on a fresh 1 GiB region (populated: every page
 * written; sparse: 1 MiB in 10 written, the rest never touched):
 *   writeprotect: UFFDIO_WRITEPROTECT over the range;
 *   scan:         PAGEMAP_SCAN with WP_MATCHING, a filter matching every page,
 *                 returning runs (PAGE_IS_PRESENT);
 *   exclusive:    the same scan with no output vector (the kernel's exclusive
 *                 write-protect path): what src/agent/tracker.ts uses.
 * Each run checks that a write afterwards, to a present and to a never-touched
 * page, is reported as written.
 * Env: MIB (region size, default 1024).
 * Build: gcc -O2 -I ../shared/limits -o protect_all protect_all.c -lpthread
 * Output: RESULT|id|description|unit|min|median|max (see common.h). */
#include "common.h"
#include <linux/userfaultfd.h>

static const char *g_name[3] = {"writeprotect", "scan", "exclusive"};

static double protect_once(int pm, size_t len, int populated, int method)
{
    uint8_t *m = map_anon(len, 1);
    for (size_t i = 0; i < len; i += PAGE)
        if (populated || (i / MiB) % 10 == 0) m[i] = 1;
    int u = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (u < 0) DIE("userfaultfd");
    struct uffdio_api api = {.api = UFFD_API, .features = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED};
    if (ioctl(u, UFFDIO_API, &api)) DIE("UFFDIO_API");
    struct uffdio_register reg = {.range = {(uintptr_t)m, len}, .mode = UFFDIO_REGISTER_MODE_WP};
    if (ioctl(u, UFFDIO_REGISTER, &reg)) DIE("UFFDIO_REGISTER");
    static struct page_region vec[4096];
    uint64_t t0 = now_ns();
    if (method == 0) {
        struct uffdio_writeprotect wp = {.range = {(uintptr_t)m, len}, .mode = UFFDIO_WRITEPROTECT_MODE_WP};
        if (ioctl(u, UFFDIO_WRITEPROTECT, &wp)) DIE("UFFDIO_WRITEPROTECT");
    } else {
        for (uint64_t s = (uintptr_t)m, e = s + len; s < e;) {
            struct pm_scan_arg a = {.size = sizeof a, .flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC, .start = s, .end = e};
            if (method == 1) a.vec = (uintptr_t)vec, a.vec_len = 4096, a.return_mask = PAGE_IS_PRESENT;
            long n = ioctl(pm, PAGEMAP_SCAN, &a);
            if (n < 0) DIE("PAGEMAP_SCAN");
            if (method == 2 || n < 4096) break;
            s = a.walk_end;
        }
    }
    double ms = (now_ns() - t0) / 1e6;
    size_t hole = populated ? 0 : 5 * MiB / PAGE + 3; /* never touched in the sparse layout; page 0 in the other */
    m[7 * PAGE] = 2, m[hole * PAGE + 1] = 2;
    struct page_region w[4];
    struct pm_scan_arg c = {.size = sizeof c, .start = (uintptr_t)m, .end = (uintptr_t)m + len, .vec = (uintptr_t)w, .vec_len = 4,
                            .category_mask = PAGE_IS_WRITTEN, .return_mask = PAGE_IS_WRITTEN};
    long n = ioctl(pm, PAGEMAP_SCAN, &c);
    size_t written = 0;
    for (long i = 0; i < n; i++) written += (w[i].end - w[i].start) / PAGE;
    if (written != 2) DIE("%s: %zu pages written after protecting, expected 2", g_name[method], written);
    close(u);
    munmap(m, len);
    return ms;
}

int main(int argc, char **argv)
{
    parse_common_args(argc, argv);
    size_t len = getenv("MIB") ? (size_t)atol(getenv("MIB")) * MiB : GiB;
    int pm = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (pm < 0) DIE("open /proc/self/pagemap");
    for (int populated = 1; populated >= 0; populated--) {
        double ms[3][64];
        FOR_RUNS(r) {
            for (int method = 0; method < 3; method++) ms[method][r] = protect_once(pm, len, populated, method);
        }
        for (int method = 0; method < 3; method++) {
            char id[96], desc[256];
            snprintf(id, sizeof id, "protect.%s.%s", populated ? "populated" : "sparse", g_name[method]);
            snprintf(desc, sizeof desc, "write-protect every page of a fresh %zu MiB region (%s) registered WP_ASYNC + WP_UNPOPULATED: %s", len / MiB,
                     populated ? "every page written" : "1 MiB in 10 written", method == 0 ? "UFFDIO_WRITEPROTECT" : method == 1 ? "PAGEMAP_SCAN WP_MATCHING returning runs" : "PAGEMAP_SCAN WP_MATCHING, no output (exclusive path)");
            report(id, desc, "ms", ms[method], NRUNS);
        }
    }
    return 0;
}
