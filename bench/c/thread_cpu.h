/* The calling thread's CPU time (user + system), seconds: what the bench/c
 * twins report per GiB. */
#ifndef BENCH_THREAD_CPU_H
#define BENCH_THREAD_CPU_H
#include <time.h>

static inline double thread_cpu_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}
#endif
