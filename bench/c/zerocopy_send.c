/* Does MSG_ZEROCOPY help the source's bulk send on this machine? The source
 * writes pages straight from region memory (writev); MSG_ZEROCOPY would pin
 * them instead of copying them into the socket. This sends 1 GiB of a
 * populated region over loopback TCP in 1 MiB sendmsg calls, plain and with
 * MSG_ZEROCOPY (completions read from the error queue, as a real sender must
 * before it may reuse the memory), a receiver thread reading it; it reports
 * the sending thread's CPU per GiB and the throughput. On loopback (and veth)
 * the kernel copies zero-copy data when it delivers it to the local socket,
 * so there is nothing to win there; a real NIC is where it pays.
 * Build: gcc -O2 -I ../shared/limits -o zerocopy_send zerocopy_send.c -lpthread
 * Output: RESULT|id|description|unit|min|median|max (see common.h). */
#include "common.h"
#include "thread_cpu.h"
#include <linux/errqueue.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>

#ifndef SO_ZEROCOPY
#define SO_ZEROCOPY 60
#endif
#ifndef MSG_ZEROCOPY
#define MSG_ZEROCOPY 0x4000000
#endif

#define CHUNK MiB

static size_t g_len;

static void *receiver(void *arg)
{
    int fd = *(int *)arg;
    uint8_t *buf = malloc(CHUNK);
    size_t got = 0;
    while (got < g_len) {
        ssize_t n = read(fd, buf, CHUNK);
        if (n <= 0) DIE("read");
        got += (size_t)n;
    }
    free(buf);
    return NULL;
}

/* completions outstanding: read what the error queue holds (block when `wait`) */
static uint32_t reap(int fd, int wait)
{
    uint32_t done = 0;
    for (;;) {
        char control[128];
        struct msghdr m = {.msg_control = control, .msg_controllen = sizeof control};
        if (wait) {
            struct pollfd p = {fd, 0, 0};
            poll(&p, 1, 100);
        }
        if (recvmsg(fd, &m, MSG_ERRQUEUE | MSG_DONTWAIT) < 0) return done;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
            struct sock_extended_err *e = (struct sock_extended_err *)CMSG_DATA(c);
            if (e->ee_origin == SO_EE_ORIGIN_ZEROCOPY) done += e->ee_data - e->ee_info + 1;
        }
        wait = 0;
    }
}

static void pair(int *a, int *b)
{
    int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof sa;
    if (bind(l, (struct sockaddr *)&sa, sizeof sa) || listen(l, 1) || getsockname(l, (struct sockaddr *)&sa, &sl)) DIE("listen");
    *a = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(*a, (struct sockaddr *)&sa, sizeof sa)) DIE("connect");
    *b = accept(l, NULL, NULL);
    close(l);
    setsockopt(*a, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

/* one send of g_len from mem; returns the sending thread's CPU s/GiB, *gbps: GiB/s */
static double send_once(const uint8_t *mem, int zc, double *gibps)
{
    int s, r, one = 1;
    pair(&s, &r);
    if (zc && setsockopt(s, SOL_SOCKET, SO_ZEROCOPY, &one, sizeof one)) DIE("SO_ZEROCOPY");
    pthread_t t;
    pthread_create(&t, NULL, receiver, &r);
    uint64_t t0 = now_ns();
    double c0 = thread_cpu_s();
    uint32_t sent_calls = 0, completed = 0;
    for (size_t off = 0; off < g_len;) {
        struct iovec v = {(void *)(mem + off), g_len - off < CHUNK ? g_len - off : CHUNK};
        struct msghdr m = {.msg_iov = &v, .msg_iovlen = 1};
        ssize_t n = sendmsg(s, &m, zc ? MSG_ZEROCOPY : 0);
        if (n < 0) {
            if (errno == ENOBUFS && zc) { completed += reap(s, 1); continue; } /* optmem full: wait for completions */
            DIE("sendmsg");
        }
        off += (size_t)n;
        if (zc) sent_calls++, completed += reap(s, 0);
    }
    while (zc && completed < sent_calls) completed += reap(s, 1);
    double cpu = thread_cpu_s() - c0;
    pthread_join(t, NULL);
    *gibps = ((double)g_len / GiB) / ((now_ns() - t0) / 1e9);
    close(s), close(r);
    return cpu / ((double)g_len / GiB);
}

int main(int argc, char **argv)
{
    parse_common_args(argc, argv);
    g_len = getenv("MIB") ? (size_t)atol(getenv("MIB")) * MiB : GiB;
    uint8_t *mem = mmap(NULL, g_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) DIE("mmap");
    for (size_t i = 0; i < g_len; i += PAGE) mem[i] = (uint8_t)(i / PAGE) | 1;
    double cpu[2][64], bw[2][64];
    FOR_RUNS(r) {
        for (int zc = 0; zc <= 1; zc++) cpu[zc][r] = send_once(mem, zc, &bw[zc][r]);
    }
    report("bulk.send.plain.src_cpu", "1 GiB over loopback TCP, 1 MiB sendmsg from populated memory: sending thread CPU per GiB", "s/GiB", cpu[0], NRUNS);
    report("bulk.send.zerocopy.src_cpu", "the same with MSG_ZEROCOPY (completions reaped): sending thread CPU per GiB", "s/GiB", cpu[1], NRUNS);
    report("bulk.send.plain.bw", "1 GiB over loopback TCP, plain sendmsg: throughput", "GiB/s", bw[0], NRUNS);
    report("bulk.send.zerocopy.bw", "the same with MSG_ZEROCOPY: throughput", "GiB/s", bw[1], NRUNS);
    return 0;
}
