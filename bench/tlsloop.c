/* bench/tlsloop.c: mean ns of SSL_write and of SSL_read of SIZE bytes over a TCP loopback
 * connection, client and server in this one thread (python -m bench.tls): each write is
 * read at once. Printed: the median per call of each (the VM is shared: a call during
 * which another process held the CPU is an outlier a mean would keep).
 * usage: dtb_tlsloop CERT KEY SIZE CALLS -> prints "write_ns read_ns" */
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n) {
    qsort(v, n, sizeof(*v), cmp);
    return v[n / 2];
}

static void die(const char *what) {
    fprintf(stderr, "tlsloop: %s\n", what);
    ERR_print_errors_fp(stderr);
    exit(1);
}

int main(int argc, char **argv) {
    if (argc != 5)
        die("usage: CERT KEY SIZE CALLS");
    int size = atoi(argv[3]), calls = atoi(argv[4]);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof(a);
    int l = socket(AF_INET, SOCK_STREAM, 0), c = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    if (bind(l, (void *)&a, sizeof(a)) || listen(l, 1) || getsockname(l, (void *)&a, &alen) ||
        connect(c, (void *)&a, sizeof(a)))
        die("socket set-up");
    int s = accept(l, 0, 0);
    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    fcntl(c, F_SETFL, O_NONBLOCK);
    fcntl(s, F_SETFL, O_NONBLOCK);
    SSL_CTX *sctx = SSL_CTX_new(TLS_server_method()), *cctx = SSL_CTX_new(TLS_client_method());
    if (SSL_CTX_use_certificate_file(sctx, argv[1], SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_use_PrivateKey_file(sctx, argv[2], SSL_FILETYPE_PEM) != 1)
        die("certificate");
    SSL *cs = SSL_new(cctx), *ss = SSL_new(sctx);
    SSL_set_fd(cs, c);
    SSL_set_fd(ss, s);
    SSL_set_connect_state(cs);
    SSL_set_accept_state(ss);
    for (int i = 0, cd = 0, sd = 0; !(cd && sd); i++) {  /* handshake, stepped in turn */
        if (i > 1000)
            die("handshake");
        if (!cd) cd = SSL_do_handshake(cs) == 1;
        if (!sd) sd = SSL_do_handshake(ss) == 1;
    }
    char *buf = calloc(1, size), *in = malloc(size);
    double *tw = malloc(calls * sizeof(double)), *tr = malloc(calls * sizeof(double));
    for (int i = -calls / 10; i < calls; i++) {  /* the first tenth warms caches */
        double t0 = now_ns();
        if (SSL_write(cs, buf, size) != size)
            die("SSL_write");
        double t1 = now_ns();
        int got = 0, n;
        while (got < size) {  /* loopback delivers within the write; retries are rare */
            n = SSL_read(ss, in + got, size - got);
            if (n > 0) got += n;
            else if (SSL_get_error(ss, n) != SSL_ERROR_WANT_READ) die("SSL_read");
        }
        double t2 = now_ns();
        if (i >= 0) {
            tw[i] = t1 - t0;
            tr[i] = t2 - t1;
        }
    }
    printf("%.1f %.1f\n", median(tw, calls), median(tr, calls));
    return 0;
}
