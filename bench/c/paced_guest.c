/* C twin of the 'paced' guest of bench/native.mjs (the C references in
 * ../shared/limits have no paced guest): a guest thread dirties random pages
 * of a populated 1 GiB region (PER_TICK random 8-byte writes every 10 ms,
 * default 1000 = 100k pages/s) and computes flat out in between. Tracking
 * (TRACKER):
 *   wp-async (default)  WP_ASYNC + a PAGEMAP_SCAN(WP_MATCHING) every 100 ms
 *                       from another thread; threads not pinned (like the
 *                       Node guest)
 *   sync-wp             the twin of the sync-wp tracker (native/wp_tracker.cc):
 *                       every page write-protected; a handler thread
 *                       un-protects each faulting page, marks it in a bitmap
 *                       and wakes the writer; every 100 ms a collector takes
 *                       the bitmap and re-protects its runs (gaps <= 128
 *                       pages bridged). PLACE=pinned: writer and handler on
 *                       CPU 1, collector on CPU 0 (the floor: no round trip
 *                       crosses CPUs and no collect shares the writer's CPU;
 *                       a library cannot pin the service's threads).
 *                       PLACE=idle: the handler in SCHED_IDLE follows the
 *                       writer's CPU, the collector runs off it (uffdm-wp's
 *                       placement).
 * Reports, over NRUNS runs (ids 4d.paced.1g.* for wp-async,
 * 5e.paced_sync.PLACE.* for sync-wp):
 *   compute_lost        compute units per second lost to tracking (%)
 *   batch_share         extra time in the write batches, as % of wall time
 *   compute_speed_lost  units per second of compute time lost (%) - the
 *                       part of the loss outside the writes (TLB flushes...)
 *   batch_us.*          mean time of one write batch
 *   us_per_write        (sync-wp) extra batch time per write
 * Build: gcc -O2 -I ../shared/limits -o paced_guest paced_guest.c -lpthread
 * Output: RESULT|id|description|unit|min|median|max (see common.h). */
#include "common.h"
#include <poll.h>

#define TICK_NS 10000000ull
#define MERGE_GAP_PAGES 128

static int PER_TICK = 1000, g_sync, g_pinned;
static volatile int g_writer_cpu = -1;

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
    int pm, uffd;
    uint32_t *dirty;  /* sync-wp: one bit per page */
    volatile int stop, handler_stop;  /* the handler stops after the writer (it may be waiting in a fault) */
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
    if (g_sync && g_pinned) pin_cpu(1);
    uint64_t t0 = now_ns(), next = t0;
    while (!c->stop) {
        next += TICK_NS;
        g_writer_cpu = sched_getcpu();
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

/* sync-wp: the fault thread (native/wp_tracker.cc run()) */
static void *handler(void *p)
{
    struct ctx *c = p;
    if (g_pinned) {
        pin_cpu(1);
    } else {
        struct sched_param sp = {0};
        if (sched_setscheduler(0, SCHED_IDLE, &sp)) DIE("sched_setscheduler(SCHED_IDLE)");
    }
    int on = -1;
    uint64_t checked = 0;
    struct uffd_msg msgs[64];
    while (!c->handler_stop) {
        struct pollfd pf = {.fd = c->uffd, .events = POLLIN};
        if (poll(&pf, 1, 100) <= 0) continue;
        ssize_t n = read(c->uffd, msgs, sizeof msgs);
        if (n <= 0) continue;
        for (size_t i = 0; i < (size_t)n / sizeof msgs[0]; i++) {
            uint64_t addr = msgs[i].arg.pagefault.address & ~(PAGE - 1);
            struct uffdio_writeprotect wp = {.range = {.start = addr, .len = PAGE}, .mode = UFFDIO_WRITEPROTECT_MODE_DONTWAKE};
            if (ioctl(c->uffd, UFFDIO_WRITEPROTECT, &wp)) DIE("UFFDIO_WRITEPROTECT");
            size_t pg = (addr - (uintptr_t)c->a) / PAGE;
            __atomic_fetch_or(&c->dirty[pg >> 5], 1u << (pg & 31), __ATOMIC_ACQ_REL);
            struct uffdio_range rg = {.start = addr, .len = PAGE};
            if (ioctl(c->uffd, UFFDIO_WAKE, &rg)) DIE("UFFDIO_WAKE");
        }
        uint64_t t = now_ns();
        if (!g_pinned && t - checked > 1000000) {
            checked = t;
            int w = g_writer_cpu;
            if (w >= 0 && w != on) pin_cpu(w), on = w;
        }
    }
    return NULL;
}

/* sync-wp: a collect (native/wp_tracker.cc Collect()): take the bitmap, re-protect its runs, off the writer's CPU */
static size_t collect_sync(struct ctx *c)
{
    if (!g_pinned && g_writer_cpu >= 0) {
        cpu_set_t away;
        CPU_ZERO(&away);
        for (int k = 0; k < 64; k++) CPU_SET(k, &away);
        CPU_CLR(g_writer_cpu, &away);
        sched_setaffinity(0, sizeof away, &away);
    }
    size_t pages = 0, first = 0, end = 0;
    int open = 0;
    for (size_t w = 0; w < (c->np + 31) / 32; w++) {
        uint32_t v = __atomic_exchange_n(&c->dirty[w], 0, __ATOMIC_ACQ_REL);
        for (; v; v &= v - 1) {
            size_t pg = w * 32 + __builtin_ctz(v);
            pages++;
            if (open && pg - end <= MERGE_GAP_PAGES) { end = pg + 1; continue; }
            if (open) uffd_wp(c->uffd, c->a + first * PAGE, (end - first) * PAGE, 1);
            first = pg, end = pg + 1, open = 1;
        }
    }
    if (open) uffd_wp(c->uffd, c->a + first * PAGE, (end - first) * PAGE, 1);
    return pages;
}

static void *scanner(void *p)
{
    struct ctx *c = p;
    if (g_sync && g_pinned) pin_cpu(0);
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    while (!c->stop) {
        next.tv_nsec += 100 * 1000 * 1000;
        if (next.tv_nsec >= 1000000000) { next.tv_nsec -= 1000000000; next.tv_sec++; }
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
        if (c->stop) break;
        c->pages += g_sync ? collect_sync(c) : scan_wp(c->pm, c->a, c->np * PAGE);
        c->scans++;
    }
    return NULL;
}

int main(int argc, char **argv)
{
    parse_common_args(argc, argv);
    if (getenv("PER_TICK")) PER_TICK = atoi(getenv("PER_TICK"));
    g_sync = getenv("TRACKER") && !strcmp(getenv("TRACKER"), "sync-wp");
    g_pinned = getenv("PLACE") && !strcmp(getenv("PLACE"), "pinned");
    double secs = getenv("SECS") ? atof(getenv("SECS")) : 3.0;
    size_t len = (getenv("MIB") ? (size_t)atol(getenv("MIB")) * MiB : GiB), np = len / PAGE;
    uint32_t *dirty = g_sync ? calloc((np + 31) / 32, 4) : NULL;
    int pm = open("/proc/self/pagemap", O_RDONLY);
    if (pm < 0) DIE("open pagemap");
    uint8_t *a = map_anon_aligned(len, 0);
    populate(a, len, 1);
    double lost[64], share[64], speed[64], bu[64], bt[64], per_write[64], dirty_pages[64];
    FOR_RUNS(r) {
        struct ctx c[2];
        for (int track = 0; track <= 1; track++) {
            c[track] = (struct ctx){.a = a, .np = np, .pm = pm, .dirty = dirty, .uffd = -1};
            int uffd = -1;
            if (track) {
                uffd = g_sync ? uffd_open_flags(UFFD_FEATURE_PAGEFAULT_FLAG_WP, O_NONBLOCK)
                              : uffd_open(UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED, NULL);
                uffd_register(uffd, a, len, UFFDIO_REGISTER_MODE_WP);
                uffd_wp(uffd, a, len, 1);
                c[track].uffd = uffd;
            }
            pthread_t tw, ts, th;
            if (track && g_sync) pthread_create(&th, NULL, handler, &c[track]);
            pthread_create(&tw, NULL, writer, &c[track]);
            if (track) pthread_create(&ts, NULL, scanner, &c[track]);
            usleep((useconds_t)(secs * 1e6));
            c[track].stop = 1;
            pthread_join(tw, NULL);
            c[track].handler_stop = 1;
            if (track) {
                pthread_join(ts, NULL);
                if (g_sync) pthread_join(th, NULL);
                uffd_wp(uffd, a, len, 0);  /* the next untracked run writes without a fault */
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
        per_write[r] = (bmean[1] - bmean[0]) / PER_TICK / 1e3;
        dirty_pages[r] = c[1].scans ? (double)c[1].pages / c[1].scans : 0;
    }
    if (g_sync) {
        const char *pl = g_pinned ? "pinned" : "idle";
        char id[96], d[256];
        snprintf(id, sizeof id, "5e.paced_sync.%s.compute_lost", pl);
        snprintf(d, sizeof d, "paced guest (%d random pages/s + compute), compute/s lost to sync-wp (%s) + 100 ms collects", PER_TICK * 100, pl);
        report(id, d, "%", lost, NRUNS);
        snprintf(id, sizeof id, "5e.paced_sync.%s.us_per_write", pl);
        report(id, "paced guest: extra batch time per write under sync-wp", "us", per_write, NRUNS);
        snprintf(id, sizeof id, "5e.paced_sync.%s.dirty_per_collect", pl);
        report(id, "paced guest: pages taken per collect", "pages", dirty_pages, NRUNS);
        return 0;
    }
    report("4d.paced.1g.compute_lost", "paced guest (100k random pages/s + compute), compute/s lost to WP_ASYNC + 100 ms scans", "%", lost, NRUNS);
    report("4d.paced.1g.batch_share", "paced guest: extra time in the 1000-write batches, % of wall time", "%", share, NRUNS);
    report("4d.paced.1g.compute_speed_lost", "paced guest: compute units per compute-second lost (outside the writes)", "%", speed, NRUNS);
    report("4d.paced.1g.batch_us.untracked", "paced guest: mean 1000-write batch, untracked", "us", bu, NRUNS);
    report("4d.paced.1g.batch_us.tracked", "paced guest: mean 1000-write batch, tracked", "us", bt, NRUNS);
    report("4d.paced.1g.dirty_per_scan", "paced guest: dirty pages found per scan", "pages", dirty_pages, NRUNS);
    return 0;
}
