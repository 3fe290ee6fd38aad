// Fixed-rate HTTP/1.1 keep-alive load generator for `python -m bench` (gcc at run time).
//
//   dtb_loadgen PORT RATE SECONDS CONNS
//
// Opens CONNS keep-alive connections to 127.0.0.1:PORT and sends `GET / HTTP/1.1` on a
// fixed schedule (request i is due at start + i/RATE) for SECONDS, one request in flight
// per connection, idle connections used round-robin, then waits for the answers. A
// request due while every connection is busy waits for the next free one (`late`: sent
// more than 1 ms after its due time; `p99_sched_us` is the latency from the due time, so
// a saturated server cannot hide). A connection the server closes (nginx closes one
// after keepalive_requests, 1000) is reopened (`reconnects`).
// Prints one JSON object: sent, completed, errors, late, reconnects, elapsed_s, rate
// (completed/s), p50/p90/p99/max latency in microseconds from the send.
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
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static const char REQ[] = "GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: dtb-loadgen\r\n\r\n";

struct conn {
    int fd;
    int busy;
    uint64_t sent_ns, due_ns;
    char buf[8192];
    int len;
    int next_idle;  // queue link
};

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

// Length of one complete response at the start of buf, or 0 if incomplete, -1 if bad;
// *close is set when the server says it closes the connection after it.
static int response_len(const char *buf, int len, int *close_after) {
    const char *end = memmem(buf, len, "\r\n\r\n", 4);
    if (!end)
        return 0;
    int head = (int)(end - buf) + 4;
    long body = 0;
    const char *p = buf;
    while (p < end) {
        const char *nl = memmem(p, end - p, "\r\n", 2);
        if (!nl)
            nl = end;
        if (nl - p > 15 && !strncasecmp(p, "Content-Length:", 15))
            body = strtol(p + 15, NULL, 10);
        if (nl - p >= 17 && !strncasecmp(p, "Connection: close", 17))
            *close_after = 1;
        p = nl + 2;
    }
    if (strncmp(buf, "HTTP/1.", 7))
        return -1;
    return head + body <= len ? (int)(head + body) : 0;
}

static struct sockaddr_in addr;
static int ep;

static int open_conn(struct conn *c, int i) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr)) {
        perror("connect");
        close(fd);
        return -1;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->fd = fd;
    c->len = 0;
    c->busy = 0;
    c->next_idle = -1;
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = i};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s PORT RATE SECONDS CONNS\n", argv[0]);
        return 2;
    }
    int port = atoi(argv[1]);
    double rate = atof(argv[2]), seconds = atof(argv[3]);
    int nconn = atoi(argv[4]);
    long total = (long)(rate * seconds);
    uint32_t *lat = calloc(total + 1, sizeof(uint32_t));
    uint32_t *slat = calloc(total + 1, sizeof(uint32_t));
    struct conn *conns = calloc(nconn, sizeof(struct conn));
    ep = epoll_create1(0);
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int head = -1, tail = -1;  // idle queue
    for (int i = 0; i < nconn; i++) {
        if (open_conn(&conns[i], i))
            return 1;
        if (tail < 0) head = i; else conns[tail].next_idle = i;
        tail = i;
    }
    long sent = 0, completed = 0, errors = 0, late = 0, reconnects = 0;
    uint64_t start = now_ns();
    uint64_t interval = (uint64_t)(1e9 / rate);
    uint64_t stop = start + (uint64_t)(seconds * 1e9);
    int inflight = 0;
    struct epoll_event evs[256];
    for (;;) {
        uint64_t now = now_ns();
        // Send everything due, while a connection is idle.
        while (sent < total && now < stop && start + sent * interval <= now && head >= 0) {
            struct conn *c = &conns[head];
            head = c->next_idle;
            if (head < 0) tail = -1;
            c->next_idle = -1;
            c->due_ns = start + sent * interval;
            c->sent_ns = now_ns();
            if (c->sent_ns - c->due_ns > 1000000)
                late++;
            if (write(c->fd, REQ, sizeof REQ - 1) != sizeof REQ - 1) {
                errors++;
                continue;
            }
            c->busy = 1;
            inflight++;
            sent++;
        }
        if ((sent >= total || now >= stop) && inflight == 0)
            break;
        if (now > stop + 5000000000ull)  // responses overdue by 5 s: give up
            break;
        // Sleep until the next request is due (or an answer arrives): no busy polling,
        // so the generator leaves the CPU to the server and the agent.
        uint64_t wait_ns = 10000000;
        if (sent < total && now < stop && head >= 0) {
            uint64_t due = start + sent * interval;
            wait_ns = due > now ? due - now : 0;
        }
        struct timespec timeout = {wait_ns / 1000000000ull, wait_ns % 1000000000ull};
        int n = epoll_pwait2(ep, evs, 256, &timeout, NULL);
        for (int k = 0; k < n; k++) {
            int i = evs[k].data.u32;
            struct conn *c = &conns[i];
            int r = read(c->fd, c->buf + c->len, sizeof c->buf - c->len);
            if (r <= 0) {
                if (r < 0 && errno == EAGAIN)
                    continue;
                // Closed under a request: counted as an error; the connection is reopened.
                epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                close(c->fd);
                if (c->busy) { inflight--; errors++; }
                if (open_conn(c, i))
                    continue;
                reconnects++;
                if (tail < 0) head = i; else conns[tail].next_idle = i;
                tail = i;
                continue;
            }
            c->len += r;
            int m, close_after = 0;
            while ((m = response_len(c->buf, c->len, &close_after)) != 0) {
                if (m < 0) {
                    errors++;
                    c->len = 0;
                    break;
                }
                memmove(c->buf, c->buf + m, c->len - m);
                c->len -= m;
                if (c->busy && close_after) {
                    // The server closes after this response (nginx: keepalive_requests).
                    uint64_t t = now_ns();
                    lat[completed] = (uint32_t)((t - c->sent_ns) / 1000);
                    slat[completed] = (uint32_t)((t - c->due_ns) / 1000);
                    completed++;
                    inflight--;
                    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                    close(c->fd);
                    if (open_conn(c, i) == 0) {
                        reconnects++;
                        if (tail < 0) head = i; else conns[tail].next_idle = i;
                        tail = i;
                    }
                    break;
                }
                if (c->busy) {
                    uint64_t t = now_ns();
                    lat[completed] = (uint32_t)((t - c->sent_ns) / 1000);
                    slat[completed] = (uint32_t)((t - c->due_ns) / 1000);
                    completed++;
                    c->busy = 0;
                    inflight--;
                    if (tail < 0) head = i; else conns[tail].next_idle = i;
                    tail = i;
                }
            }
        }
    }
    double elapsed = (now_ns() - start) / 1e9;
    qsort(lat, completed, sizeof(uint32_t), cmp_u32);
    qsort(slat, completed, sizeof(uint32_t), cmp_u32);
#define PCT(a, p) (completed ? a[(long)((completed - 1) * (p))] : 0)
    printf("{\"sent\": %ld, \"completed\": %ld, \"errors\": %ld, \"late\": %ld, "
           "\"reconnects\": %ld, "
           "\"elapsed_s\": %.3f, \"target_rate\": %.0f, \"rate\": %.1f, \"p50_us\": %u, "
           "\"p90_us\": %u, \"p99_us\": %u, \"max_us\": %u, \"p99_sched_us\": %u}\n",
           sent, completed, errors, late, reconnects, elapsed, rate,
           completed / (elapsed > 0 ? elapsed : 1), PCT(lat, 0.5), PCT(lat, 0.9),
           PCT(lat, 0.99), completed ? lat[completed - 1] : 0, PCT(slat, 0.99));
    for (int i = 0; i < nconn; i++)
        close(conns[i].fd);
    return 0;
}
