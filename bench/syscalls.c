// Per-syscall latency driver for `python -m bench` (compiled with gcc at run time).
//
//   dtb_syscalls COMM OUTDIR N CASE[,CASE...]
//
// Sets its comm to COMM (prctl), so an agent's `comms` filter selects or excludes it,
// then for each CASE makes N timed calls of each of its syscalls (after 1000 untimed
// warm-up calls) and writes OUTDIR/<proto>.<syscall>.u32: one little-endian uint32 per
// call, the nanoseconds between clock_gettime(CLOCK_MONOTONIC) just before and just after
// the call (vDSO, ~20 ns; the same in every condition, so it cancels in the deltas).
//
// Cases (64-byte messages; TCP_NODELAY; blocking sockets on 127.0.0.1):
//   tcp_rw     write + read           tcp_vec    writev + readv (2 iovecs of 32 bytes)
//   tcp_to     sendto + recvfrom      tcp_msg    sendmsg + recvmsg
//   tcp_mmsg   sendmmsg + recvmmsg (one message per call)
//   udp_to     sendto(addr) + recvfrom(addr) on unconnected UDP sockets
//   udp_msg    sendmsg + recvmsg with msg_name      udp_mmsg   sendmmsg + recvmmsg
//   tcp_conn   socket + connect + accept + close (the client's close, SO_LINGER 0 so no
//              TIME_WAIT piles up; the accepted end is closed untimed)
//   epoll      epoll_wait (timeout 0) on an always-ready eventfd: one event-loop
//              iteration's wait, for the loop counter's cost (written as epoll.epoll_wait)
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define MSG 64
#define WARMUP 1000

static long n_calls;
static const char *outdir;

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

#define TIMED(arr, i, call, check)                       \
    do {                                                 \
        uint64_t _t0 = now_ns();                         \
        long _r = (long)(call);                          \
        uint64_t _t1 = now_ns();                         \
        if (!(check)) { (void)_r; die(#call); }          \
        if ((i) >= 0) (arr)[(i)] = (uint32_t)(_t1 - _t0); \
    } while (0)

struct series { const char *name; uint32_t *v; };

static void save(const char *proto, struct series *s, int n) {
    for (int k = 0; k < n; k++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/%s.%s.u32", outdir, proto, s[k].name);
        FILE *f = fopen(path, "wb");
        if (!f)
            die(path);
        if (fwrite(s[k].v, sizeof(uint32_t), n_calls, f) != (size_t)n_calls)
            die("fwrite");
        fclose(f);
        free(s[k].v);
    }
}

static uint32_t *alloc_series(void) {
    uint32_t *v = calloc(n_calls, sizeof(uint32_t));
    if (!v)
        die("calloc");
    return v;
}

static int listener(struct sockaddr_in *addr) {
    int l = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    memset(addr, 0, sizeof *addr);
    addr->sin_family = AF_INET;
    addr->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(l, (struct sockaddr *)addr, sizeof *addr) || listen(l, 1024))
        die("listen");
    socklen_t len = sizeof *addr;
    getsockname(l, (struct sockaddr *)addr, &len);
    return l;
}

static void tcp_pair(int *c, int *s) {
    struct sockaddr_in addr;
    int l = listener(&addr);
    *c = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(*c, (struct sockaddr *)&addr, sizeof addr))
        die("connect");
    *s = accept(l, NULL, NULL);
    if (*s < 0)
        die("accept");
    close(l);
    int one = 1;
    setsockopt(*c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(*s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static void udp_pair(int *a, int *b, struct sockaddr_in *addr_b) {
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    *a = socket(AF_INET, SOCK_DGRAM, 0);
    *b = socket(AF_INET, SOCK_DGRAM, 0);
    if (bind(*a, (struct sockaddr *)&addr, sizeof addr) ||
        bind(*b, (struct sockaddr *)&addr, sizeof addr))
        die("bind");
    socklen_t len = sizeof *addr_b;
    getsockname(*b, (struct sockaddr *)addr_b, &len);
    int big = 4 << 20;
    setsockopt(*b, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
}

// Egress then ingress of one 64-byte message, N times, on a TCP pair or UDP pair.
static void data_case(const char *which) {
    int udp = !strncmp(which, "udp", 3);
    const char *kind = which + 4;
    int c, s;
    struct sockaddr_in peer;
    if (udp)
        udp_pair(&c, &s, &peer);
    else
        tcp_pair(&c, &s);
    char out[MSG], in[MSG];
    memset(out, 'x', sizeof out);
    struct series ser[2] = {{0}};
    ser[0].v = alloc_series();
    ser[1].v = alloc_series();
    struct sockaddr_in from;
    socklen_t fromlen;
    struct iovec oiov[2] = {{out, MSG / 2}, {out + MSG / 2, MSG / 2}};
    struct iovec iiov[2] = {{in, MSG / 2}, {in + MSG / 2, MSG / 2}};
    struct iovec o1 = {out, MSG}, i1 = {in, MSG};
    struct msghdr omsg = {0}, imsg = {0};
    omsg.msg_iov = &o1; omsg.msg_iovlen = 1;
    imsg.msg_iov = &i1; imsg.msg_iovlen = 1;
    if (udp) {
        omsg.msg_name = &peer; omsg.msg_namelen = sizeof peer;
        imsg.msg_name = &from; imsg.msg_namelen = sizeof from;
    }
    struct mmsghdr omm = {.msg_hdr = omsg}, imm = {.msg_hdr = imsg};
    const struct sockaddr *to = udp ? (const struct sockaddr *)&peer : NULL;
    socklen_t tolen = udp ? sizeof peer : 0;

    int mode;
    if (!strcmp(kind, "rw")) {
        mode = 0; ser[0].name = "write"; ser[1].name = "read";
    } else if (!strcmp(kind, "vec")) {
        mode = 1; ser[0].name = "writev"; ser[1].name = "readv";
    } else if (!strcmp(kind, "to")) {
        mode = 2; ser[0].name = "sendto"; ser[1].name = "recvfrom";
    } else if (!strcmp(kind, "msg")) {
        mode = 3; ser[0].name = "sendmsg"; ser[1].name = "recvmsg";
    } else if (!strcmp(kind, "mmsg")) {
        mode = 4; ser[0].name = "sendmmsg"; ser[1].name = "recvmmsg";
    } else {
        fprintf(stderr, "unknown case %s\n", which);
        exit(2);
    }
    for (long i = -WARMUP; i < n_calls; i++) {
        long k = i;  // negative: warm-up, not recorded
        switch (mode) {
        case 0:
            TIMED(ser[0].v, k, write(c, out, MSG), _r == MSG);
            TIMED(ser[1].v, k, read(s, in, MSG), _r == MSG);
            break;
        case 1:
            TIMED(ser[0].v, k, writev(c, oiov, 2), _r == MSG);
            TIMED(ser[1].v, k, readv(s, iiov, 2), _r == MSG);
            break;
        case 2:
            fromlen = sizeof from;
            TIMED(ser[0].v, k, sendto(c, out, MSG, 0, to, tolen), _r == MSG);
            TIMED(ser[1].v, k, recvfrom(s, in, MSG, 0, udp ? (struct sockaddr *)&from : NULL,
                                        udp ? &fromlen : NULL), _r == MSG);
            break;
        case 3:
            imsg.msg_namelen = udp ? sizeof from : 0;
            TIMED(ser[0].v, k, sendmsg(c, &omsg, 0), _r == MSG);
            TIMED(ser[1].v, k, recvmsg(s, &imsg, 0), _r == MSG);
            break;
        case 4:
            imm.msg_hdr.msg_namelen = udp ? sizeof from : 0;
            TIMED(ser[0].v, k, sendmmsg(c, &omm, 1, 0), _r == 1);
            TIMED(ser[1].v, k, recvmmsg(s, &imm, 1, 0, NULL), _r == 1);
            break;
        }
    }
    close(c);
    close(s);
    save(udp ? "udp" : "tcp", ser, 2);
}

static void conn_case(void) {
    struct sockaddr_in addr;
    int l = listener(&addr);
    struct series ser[4] = {{"socket", alloc_series()}, {"connect", alloc_series()},
                            {"accept", alloc_series()}, {"close", alloc_series()}};
    struct linger lin = {1, 0};
    for (long i = -WARMUP; i < n_calls; i++) {
        int c = -1, a = -1;
        uint64_t t0 = now_ns();
        c = socket(AF_INET, SOCK_STREAM, 0);
        uint64_t t1 = now_ns();
        if (c < 0)
            die("socket");
        setsockopt(c, SOL_SOCKET, SO_LINGER, &lin, sizeof lin);
        TIMED(ser[1].v, i, connect(c, (struct sockaddr *)&addr, sizeof addr), _r == 0);
        uint64_t t2 = now_ns();
        a = accept(l, NULL, NULL);
        uint64_t t3 = now_ns();
        if (a < 0)
            die("accept");
        TIMED(ser[3].v, i, close(c), _r == 0);
        close(a);
        if (i >= 0) {
            ser[0].v[i] = (uint32_t)(t1 - t0);
            ser[2].v[i] = (uint32_t)(t3 - t2);
        }
    }
    close(l);
    save("tcp", ser, 4);
}

static void epoll_case(void) {
    int ep = epoll_create1(0), efd = eventfd(1, 0);   // counter 1: readable until read
    struct epoll_event ev = {.events = EPOLLIN}, got;
    if (ep < 0 || efd < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, efd, &ev))
        die("epoll");
    struct series ser[1] = {{"epoll_wait", alloc_series()}};
    for (long i = -WARMUP; i < n_calls; i++)
        TIMED(ser[0].v, i, epoll_wait(ep, &got, 1, 0), _r == 1);
    close(efd);
    close(ep);
    save("epoll", ser, 1);
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s COMM OUTDIR N CASE[,CASE...]\n", argv[0]);
        return 2;
    }
    prctl(PR_SET_NAME, argv[1], 0, 0, 0);
    outdir = argv[2];
    n_calls = atol(argv[3]);
    char *cases = strdup(argv[4]), *save_ptr = NULL;
    for (char *c = strtok_r(cases, ",", &save_ptr); c; c = strtok_r(NULL, ",", &save_ptr)) {
        if (!strcmp(c, "tcp_conn"))
            conn_case();
        else if (!strcmp(c, "epoll"))
            epoll_case();
        else
            data_case(c);
    }
    return 0;
}
