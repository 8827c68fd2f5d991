/* A write-protect fault the faulting thread resolves itself, as a tracker
 * could with UFFD_FEATURE_SIGBUS (the kernel raises SIGBUS instead of queueing
 * an event; the handler un-protects the page, then the write is retried): no
 * second thread, no wake-up, no CPU crossing. Measured as sync_wp_class.c
 * measures the handler thread: a writer writes one byte to each of NPAGES
 * write-protected pages back to back; the mean time of such a write, us.
 * Also what the mode costs a service, which is why the sync-wp tracker does
 * not use it: a write into a protected page made by the kernel on the
 * service's behalf (read(2) into a guest region) is not retried, it fails
 * with EFAULT. Reported as wp_sigbus.kernel_write_errno (14: EFAULT).
 * Env: NPAGES (default 20000).
 * Build: gcc -O2 -I ../shared/limits -o wp_sigbus wp_sigbus.c -lpthread
 * Output: RESULT|id|description|unit|min|median|max (see common.h). */
#include "common.h"
#include <signal.h>

static int g_uffd;
static uint8_t *g_base;
static size_t g_len;

static void on_bus(int sig, siginfo_t *si, void *uc)
{
    (void)uc;
    uintptr_t a = (uintptr_t)si->si_addr & ~(uintptr_t)(PAGE - 1);
    if (a < (uintptr_t)g_base || a >= (uintptr_t)g_base + g_len) {
        signal(sig, SIG_DFL); /* not ours: the default action */
        return;
    }
    struct uffdio_writeprotect wp = {.range = {.start = a, .len = PAGE}, .mode = 0};
    if (ioctl(g_uffd, UFFDIO_WRITEPROTECT, &wp)) _exit(90);
}

int main(int argc, char **argv)
{
    parse_common_args(argc, argv);
    size_t np = getenv("NPAGES") ? (size_t)atol(getenv("NPAGES")) : 20000;
    struct sigaction sa = {0};
    sa.sa_sigaction = on_bus;
    sa.sa_flags = SA_SIGINFO;
    if (sigaction(SIGBUS, &sa, NULL)) DIE("sigaction");
    double mean[64], err[64];
    FOR_RUNS(r) {
        g_uffd = uffd_open_flags(UFFD_FEATURE_SIGBUS, 0);
        g_len = np * PAGE;
        g_base = map_anon_aligned(g_len, 0);
        populate(g_base, g_len, 1);
        uffd_register(g_uffd, g_base, g_len, UFFDIO_REGISTER_MODE_WP);
        uffd_wp(g_uffd, g_base, g_len, 1);
        uint64_t t0 = now_ns();
        for (size_t i = 0; i < np; i++) ((volatile uint8_t *)g_base)[i * PAGE + 8] = 2;
        mean[r] = (now_ns() - t0) / 1e3 / np;
        uffd_wp(g_uffd, g_base, PAGE, 1);
        int z = open("/dev/zero", O_RDONLY);
        err[r] = read(z, g_base, PAGE) < 0 ? errno : 0;
        close(z);
        munmap(g_base, g_len);
        close(g_uffd);
    }
    report("wp_sigbus.mean", "write-protect fault resolved by the faulting thread (UFFD_FEATURE_SIGBUS), writer faulting back to back: mean", "us", mean, NRUNS);
    report("wp_sigbus.kernel_write_errno", "read(2) into a protected page in that mode: errno (14 EFAULT: the kernel does not retry)", "errno", err, NRUNS);
    return 0;
}
