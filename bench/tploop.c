// getppid() in a loop: prints the fastest of `rounds` timed runs of `n` calls, in ns per
// call. A syscall with no work of its own, so what a tracepoint adds stands out.
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 20000, rounds = argc > 2 ? atoi(argv[2]) : 20;
    long best = -1;
    for (int r = 0; r < rounds; r++) {
        long t0 = now_ns();
        for (int i = 0; i < n; i++)
            syscall(SYS_getppid);
        long d = now_ns() - t0;
        if (best < 0 || d < best)
            best = d;
    }
    printf("%.1f\n", (double)best / n);
    return 0;
}
