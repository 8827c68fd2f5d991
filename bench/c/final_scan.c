/* C floor of the hybrid hand-off's final scan at each guest size: one
 * PAGEMAP_SCAN (WP_MATCHING + CHECK_WPASYNC, PAGE_IS_WRITTEN) over a region
 * laid out as the page-store's (7 of 8 pages populated, the 8th never
 * written), WP_ASYNC-tracked and fully protected, in which a handful of
 * random pages were written since (what a guest writing 10k pages/s writes
 * in the few ms before its pause). The kernel walks every page table of the
 * region whatever was written, so this is the least any final scan of that
 * much memory costs, in the pause window, on this machine.
 * Env: SIZES_MIB (comma list, default 256,4096), WRITTEN (pages, default 32).
 * Build: gcc -O2 -I ../shared/limits -o final_scan final_scan.c -lpthread
 * Output: RESULT|id|description|unit|min|median|max (see common.h). */
#include "common.h"

static struct page_region g_vec[4096];

/* one full scan of [a, a+len), re-protecting what it reports: pages reported */
static size_t scan(int pm, uint8_t *a, size_t len)
{
    size_t pages = 0;
    uint64_t s = (uintptr_t)a, e = (uintptr_t)a + len;
    while (s < e) {
        struct pm_scan_arg q = {.size = sizeof q, .flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC, .start = s, .end = e,
                                .vec = (uintptr_t)g_vec, .vec_len = 4096, .category_mask = PAGE_IS_WRITTEN,
                                .return_mask = PAGE_IS_WRITTEN};
        long n = ioctl(pm, PAGEMAP_SCAN, &q);
        if (n < 0) DIE("PAGEMAP_SCAN");
        for (long i = 0; i < n; i++) pages += (g_vec[i].end - g_vec[i].start) / PAGE;
        if (n < 4096) break; /* only a full vector means more (walk_end can be stale: see b4_wp.c) */
        if (q.walk_end <= s) DIE("PAGEMAP_SCAN made no progress");
        s = q.walk_end;
    }
    return pages;
}

int main(int argc, char **argv)
{
    parse_common_args(argc, argv);
    const char *sizes = getenv("SIZES_MIB") ? getenv("SIZES_MIB") : "256,4096";
    size_t written = getenv("WRITTEN") ? (size_t)atol(getenv("WRITTEN")) : 32;
    int pm = open("/proc/self/pagemap", O_RDONLY);
    if (pm < 0) DIE("open /proc/self/pagemap");
    for (const char *p = sizes; *p;) {
        size_t mib = (size_t)atol(p), len = mib * MiB, np = len / PAGE;
        uint8_t *a = map_anon_aligned(len, 0);
        for (size_t i = 0; i < np; i++)
            if (i % 8 != 7) a[i * PAGE] = 1;
        int uffd = uffd_open(UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED, NULL);
        uffd_register(uffd, a, len, UFFDIO_REGISTER_MODE_WP);
        uffd_wp(uffd, a, len, 1);
        double ms[64];
        uint64_t x = 0x9E3779B97F4A7C15ull;
        FOR_RUNS(r) {
            for (size_t k = 0; k < written; k++) {
                x ^= x << 13, x ^= x >> 7, x ^= x << 17;
                a[(x % np) * PAGE + 64] = (uint8_t)r;
            }
            uint64_t t0 = now_ns();
            size_t got = scan(pm, a, len);
            ms[r] = (now_ns() - t0) / 1e6;
            if (got == 0 || got > written) fprintf(stderr, "final_scan %zu MiB: %zu pages reported, %zu written\n", mib, got, written);
        }
        char id[64], d[256];
        snprintf(id, sizeof id, "migrate.final_scan.%zum", mib);
        snprintf(d, sizeof d, "PAGEMAP_SCAN(WP_MATCHING) of %zu MiB (7 of 8 pages populated, WP_ASYNC), %zu pages written since the last scan", mib, written);
        report(id, d, "ms", ms, NRUNS);
        munmap(a, len);
        close(uffd);
        p = strchr(p, ',');
        if (!p) break;
        p++;
    }
    close(pm);
    return 0;
}
