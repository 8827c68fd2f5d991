/* The sync write-protect round trip with the handler's scheduling class and
 * placement as the sync-wp tracker can choose them (native/wp_tracker.cc):
 * a writer (not pinned) writes one byte to each of NPAGES write-protected
 * pages back to back (a guest dirtying pages in a burst); a handler thread
 * un-protects each faulting page and wakes the writer. Handler:
 *   follow      normal class, moves to the writer's CPU at most once a ms
 *   idle_follow the same in SCHED_IDLE (a woken writer stays on a CPU that
 *               runs only idle-class work)
 *   pinned      normal class, writer and handler pinned to one CPU (the
 *               floor: no thread ever crosses CPUs; a library cannot pin
 *               the service's threads)
 * Reports the mean time of a faulting write, us, and how often the writer
 * changed CPUs. Env: NPAGES (default 20000).
 * Build: gcc -O2 -I ../shared/limits -o sync_wp_class sync_wp_class.c -lpthread
 * Output: RESULT|id|description|unit|min|median|max (see common.h). */
#include "common.h"
#include <poll.h>

static int g_uffd;
static volatile int g_stop, g_writer_cpu = -1;
static int g_follow, g_idle;

static void *handler(void *arg)
{
    (void)arg;
    if (g_idle) {
        struct sched_param sp = {0};
        if (sched_setscheduler(0, SCHED_IDLE, &sp)) DIE("sched_setscheduler(SCHED_IDLE)");
    }
    int on = -1;
    uint64_t checked = 0;
    struct uffd_msg msg;
    while (!g_stop) {
        struct pollfd p = {.fd = g_uffd, .events = POLLIN};
        if (poll(&p, 1, 100) <= 0) continue;
        if (read(g_uffd, &msg, sizeof msg) != sizeof msg) continue;
        uint64_t addr = msg.arg.pagefault.address & ~(PAGE - 1);
        struct uffdio_writeprotect wp = {.range = {.start = addr, .len = PAGE}, .mode = 0};
        if (ioctl(g_uffd, UFFDIO_WRITEPROTECT, &wp)) DIE("UFFDIO_WRITEPROTECT");
        uint64_t t = now_ns();
        if (g_follow && t - checked > 1000000) {
            checked = t;
            int c = g_writer_cpu;
            if (c >= 0 && c != on) pin_cpu(c), on = c;
        }
    }
    return NULL;
}

static void run_mode(const char *mode, size_t np)
{
    double mean[64], moves[64];
    FOR_RUNS(r) {
        g_follow = strcmp(mode, "pinned") != 0;
        g_idle = strcmp(mode, "idle_follow") == 0;
        g_stop = 0;
        cpu_set_t all;
        CPU_ZERO(&all);
        for (int c = 0; c < CPU_SETSIZE && c < 64; c++) CPU_SET(c, &all);
        sched_setaffinity(0, sizeof all, &all);
        if (!g_follow) pin_cpu(1);
        g_uffd = uffd_open_flags(UFFD_FEATURE_PAGEFAULT_FLAG_WP, O_NONBLOCK);
        uint8_t *a = map_anon_aligned(np * PAGE, 0);
        populate(a, np * PAGE, 1);
        uffd_register(g_uffd, a, np * PAGE, UFFDIO_REGISTER_MODE_WP);
        uffd_wp(g_uffd, a, np * PAGE, 1);
        pthread_t th;
        pthread_create(&th, NULL, handler, NULL);
        usleep(20000);
        int last = sched_getcpu(), changed = 0;
        uint64_t lost = 0;
        for (size_t i = 0; i < np; i++) {
            int c = sched_getcpu();
            if (c != last) changed++, last = c;
            g_writer_cpu = c;
            uint64_t t0 = now_ns();
            ((volatile uint8_t *)a)[i * PAGE + 8] = 2;
            lost += now_ns() - t0;
        }
        g_stop = 1;
        pthread_join(th, NULL);
        mean[r] = lost / 1e3 / np;
        moves[r] = changed;
        munmap(a, np * PAGE);
        close(g_uffd);
    }
    char id[96], d[256];
    snprintf(id, sizeof id, "wp_class.%s.mean", mode);
    snprintf(d, sizeof d, "sync WP fault round trip, writer faulting back to back, handler %s: mean", mode);
    report(id, d, "us", mean, NRUNS);
    snprintf(id, sizeof id, "wp_class.%s.writer_moves", mode);
    snprintf(d, sizeof d, "times the writer changed CPUs in %zu faults, handler %s", np, mode);
    report(id, d, "moves", moves, NRUNS);
}

int main(int argc, char **argv)
{
    parse_common_args(argc, argv);
    size_t np = getenv("NPAGES") ? (size_t)atol(getenv("NPAGES")) : 20000;
    run_mode("follow", np);
    run_mode("idle_follow", np);
    run_mode("pinned", np);
    return 0;
}
