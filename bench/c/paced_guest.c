/* C twin of the 'paced' guest of bench/native.mjs (the C references in
 * ../shared/limits have no paced guest): a guest thread dirties 100k random
 * pages/s of a populated 1 GiB region (1000 random 8-byte writes every 10 ms)
 * and computes flat out in between; with tracking, WP_ASYNC + a
 * PAGEMAP_SCAN(WP_MATCHING) every 100 ms from another thread. Threads are
 * not pinned (like the Node guest). Reports, over NRUNS runs:
 *   compute_lost        compute units per second lost to tracking (%)
 *   batch_share         extra time in the write batches, as % of wall time
 *   compute_speed_lost  units per second of compute time lost (%) - the
 *                       part of the loss outside the writes (TLB flushes...)
 *   batch_us.*          mean time of one 1000-write batch
 * Build: gcc -O2 -I ../shared/limits -o paced_guest paced_guest.c -lpthread
 * Output: RESULT|id|description|unit|min|median|max (see common.h). */
#include "common.h"

#define TICK_NS 10000000ull
#define PER_TICK 1000

static struct page_region g_vec[4096];

static size_t scan_wp(int pm, uint8_t *start, size_t len)
{
    size_t pages = 0;
    uint64_t s = (uintptr_t)start, e = s + len;
    while (s < e) {
        struct pm_scan_arg a = {.size = sizeof(a), .flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC, .start = s,
                                .end = e, .vec = (uintptr_t)g_vec, .vec_len = 4096,
                                .category_mask = PAGE_IS_WRITTEN, .return_mask = PAGE_IS_WRITTEN};
        long n = ioctl(pm, PAGEMAP_SCAN, &a);
        if (n < 0) DIE("PAGEMAP_SCAN");
        for (long i = 0; i < n; i++) pages += (g_vec[i].end - g_vec[i].start) / PAGE;
        if (n < 4096) break;
        s = a.walk_end;
    }
    return pages;
}

struct ctx {
    uint8_t *a;
    size_t np;
    int pm;
    volatile int stop;
    uint64_t t0, t1, units, batch_ns, compute_ns, ticks, scans, pages;
};

/* the same unit of work as chunk() in native.mjs */
static uint32_t chunk(uint32_t h)
{
    for (uint32_t i = 0; i < 2000; i++) {
        h = (h ^ (h >> 15)) * 0x2c1b3c6du + i;
        __asm__ volatile("" : "+r"(h));
    }
    return h;
}

static void *writer(void *p)
{
    struct ctx *c = p;
    uint64_t s = 0x9E3779B97F4A7C15ull, units = 0, bns = 0, cns = 0, k = 0;
    uint32_t h = 1;
    uint64_t t0 = now_ns(), next = t0;
    while (!c->stop) {
        next += TICK_NS;
        uint64_t a = now_ns();
        for (int j = 0; j < PER_TICK; j++) {
            uint64_t x = xs64(&s);
            *(volatile uint64_t *)(c->a + ((x >> 16) % c->np) * PAGE + (x & 0x1ff) * 8) = x;
        }
        uint64_t b = now_ns();
        bns += b - a;
        while (now_ns() < next) {
            h = chunk(h);
            units++;
        }
        cns += now_ns() - b;
        k++;
    }
    c->t0 = t0;
    c->t1 = now_ns();
    c->units = units;
    c->batch_ns = bns;
    c->compute_ns = cns;
    c->ticks = k;
    return (void *)(uintptr_t)h;
}

static void *scanner(void *p)
{
    struct ctx *c = p;
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    while (!c->stop) {
        next.tv_nsec += 100 * 1000 * 1000;
        if (next.tv_nsec >= 1000000000) { next.tv_nsec -= 1000000000; next.tv_sec++; }
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
        if (c->stop) break;
        c->pages += scan_wp(c->pm, c->a, c->np * PAGE);
        c->scans++;
    }
    return NULL;
}

int main(int argc, char **argv)
{
    parse_common_args(argc, argv);
    double secs = getenv("SECS") ? atof(getenv("SECS")) : 3.0;
    size_t len = (getenv("MIB") ? (size_t)atol(getenv("MIB")) * MiB : GiB), np = len / PAGE;
    int pm = open("/proc/self/pagemap", O_RDONLY);
    if (pm < 0) DIE("open pagemap");
    uint8_t *a = map_anon_aligned(len, 0);
    populate(a, len, 1);
    double lost[64], share[64], speed[64], bu[64], bt[64], dirty[64];
    FOR_RUNS(r) {
        struct ctx c[2];
        for (int track = 0; track <= 1; track++) {
            c[track] = (struct ctx){.a = a, .np = np, .pm = pm};
            int uffd = -1;
            if (track) {
                uffd = uffd_open(UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED, NULL);
                uffd_register(uffd, a, len, UFFDIO_REGISTER_MODE_WP);
                uffd_wp(uffd, a, len, 1);
            }
            pthread_t tw, ts;
            pthread_create(&tw, NULL, writer, &c[track]);
            if (track) pthread_create(&ts, NULL, scanner, &c[track]);
            usleep((useconds_t)(secs * 1e6));
            c[track].stop = 1;
            pthread_join(tw, NULL);
            if (track) {
                pthread_join(ts, NULL);
                struct uffdio_range rg = {.start = (uintptr_t)a, .len = len};
                ioctl(uffd, UFFDIO_UNREGISTER, &rg);
                close(uffd);
            }
        }
        double rate[2], crate[2], bmean[2];
        for (int t = 0; t <= 1; t++) {
            rate[t] = c[t].units / ((c[t].t1 - c[t].t0) / 1e9);
            crate[t] = c[t].units / (c[t].compute_ns / 1e9);
            bmean[t] = (double)c[t].batch_ns / c[t].ticks;
        }
        lost[r] = (1 - rate[1] / rate[0]) * 100;
        speed[r] = (1 - crate[1] / crate[0]) * 100;
        share[r] = (bmean[1] - bmean[0]) / TICK_NS * 100;
        bu[r] = bmean[0] / 1e3;
        bt[r] = bmean[1] / 1e3;
        dirty[r] = c[1].scans ? (double)c[1].pages / c[1].scans : 0;
    }
    report("4d.paced.1g.compute_lost", "paced guest (100k random pages/s + compute), compute/s lost to WP_ASYNC + 100 ms scans", "%", lost, NRUNS);
    report("4d.paced.1g.batch_share", "paced guest: extra time in the 1000-write batches, % of wall time", "%", share, NRUNS);
    report("4d.paced.1g.compute_speed_lost", "paced guest: compute units per compute-second lost (outside the writes)", "%", speed, NRUNS);
    report("4d.paced.1g.batch_us.untracked", "paced guest: mean 1000-write batch, untracked", "us", bu, NRUNS);
    report("4d.paced.1g.batch_us.tracked", "paced guest: mean 1000-write batch, tracked", "us", bt, NRUNS);
    report("4d.paced.1g.dirty_per_scan", "paced guest: dirty pages found per scan", "pages", dirty, NRUNS);
    return 0;
}
