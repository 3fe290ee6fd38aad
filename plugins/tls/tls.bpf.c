// tls.bpf.c: TLS plaintext at the OpenSSL API (uprobes on SSL_read/SSL_write and their
// _ex forms), mapped to the TCP connection underneath, one record per completed call.
//
// No kprobes on this kernel: the connection comes from the socket syscalls the thread
// makes, seen at the syscall exit tracepoints (their arguments read from the entry
// registers, bpf_task_pt_regs, as the trace probe does). The rules, in order, each
// counted:
//   1. nested: a socket call of the call's direction made inside SSL_read/SSL_write on
//      the same thread (socket BIOs: nginx, curl's own BIO, Python's ssl, redis); the
//      record carries the TCP range those calls moved;
//   2. ssl_map: the lasting (tgid, SSL*) -> fd map, filled by SSL_set_fd and by rule 1
//      (a read served from OpenSSL's buffer makes no syscall, and carries no range);
//   3. neighbour: memory BIOs (Python asyncio, Node) move the ciphertext outside the
//      calls, on the same thread. The first SSL call that consumes ciphertext follows the
//      connection's first socket read, and the first that produces some precedes its
//      first socket write: those give the fd and where each direction's stream starts,
//      kept in the lasting map. From then on the BIOs' own byte counters (the read BIO's
//      num_read, the write BIO's num_write: OpenSSL moves them on each BIO_read and
//      BIO_write it makes) give each call's exact ciphertext range.
// A call no rule maps is counted (unmapped_read, unmapped_write) and dropped, never
// guessed.
//
// Kernel structs are read at BTF offsets (OFF_<struct>__<member>) with probe_read only.
// Knobs (probe.py): PAYLOAD_CAP, PAYLOAD_MAX, RINGBUF_PAGES, WAKEUP_BYTES, SSL_MAX,
// SELF_TGID, NEIGHBOUR_NS, BIO_NUM_READ, BIO_NUM_WRITE (in OpenSSL 3's struct bio_st: the
// SSL_set_bio program is attached only to files of that major version).

// struct pt_regs: the uprobe context. Only its argument and return registers are read
// (PT_REGS_*), whose places are x86-64 ABI; every kernel struct goes through BTF offsets.
#include <uapi/linux/ptrace.h>

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define S_IFMT 0170000
#define S_IFSOCK 0140000

// decoder.py mirrors these tables. gotls.bpf.c's OP_GO_* continue from 6.
enum { OP_READ = 1, OP_WRITE, OP_READ_EX, OP_WRITE_EX, OP_HANDSHAKE };
enum { EV_DATA = 1, EV_CLOSE, EV_LOADED };
enum { RULE_NONE = 0, RULE_NESTED, RULE_SSL_MAP, RULE_NEIGHBOUR };
enum { DIR_INGRESS = 1, DIR_EGRESS = 2 };
#define F_SEQ 1          // seq_start..seq_end is the ciphertext's TCP range
#define F_TRUNC 2        // payload cut at the cap

enum { ST_EVENTS = 0, ST_RB_FULL, ST_READ_FAIL, ST_STATE_FAIL, ST_MAP_FULL, ST_NESTED,
       ST_SSL_MAP, ST_NEIGHBOUR, ST_UNMAPPED_READ, ST_UNMAPPED_WRITE, ST_NOT_TCP,
       ST_NSTATS };
BPF_PERCPU_ARRAY(stats, u64, ST_NSTATS);

static __always_inline void stat_inc(u32 idx) {
    u64 *v = stats.lookup(&idx);
    if (v) *v += 1;
}

struct tls_event_t {
    u64 ts_enter;
    u64 ts_exit;
    u64 conn_id;
    u64 ssl;
    s64 ret;          // plaintext bytes the call moved
    u32 pid;
    u32 tid;
    s32 fd;
    u32 seq_start;
    u32 seq_end;
    u32 payload_len;
    u16 family;
    u16 lport;
    u16 rport;
    u8 kind;          // EV_*
    u8 op;            // OP_*
    u8 rule;          // RULE_*
    u8 flags;
    u8 pad[6];
    u8 laddr[16];
    u8 raddr[16];
    char comm[16];
    u8 payload[PAYLOAD_MAX * 2];  // twice the cap so the verifier can bound the copy
};
#define EVENT_HDR (sizeof(struct tls_event_t) - PAYLOAD_MAX * 2)

BPF_PERCPU_ARRAY(scratch, struct tls_event_t, 1);
BPF_RINGBUF_OUTPUT(tls_events, RINGBUF_PAGES);

// Per thread, in the thread's own storage (freed with it): the SSL call in progress and
// what its nested socket calls showed, the thread's last socket read outside SSL calls,
// and an SSL* whose sent stream the thread's next socket write starts (rule 3).
struct thread_t {
    u64 ssl;          // SSL* of the call in progress; 0: none
    u64 buf;
    u64 ex_ptr;       // size_t * of the _ex forms
    u64 ts;
    u64 sk;           // rule 1: the socket's sock
    u64 set_fd_ssl;   // SSL_set_fd in progress (its inner SSL_set_bio is not a memory BIO)
    u64 last_sk;      // the last socket read outside SSL calls
    u64 last_ts;
    u64 want_ssl;     // the next socket write starts this SSL*'s sent stream
    u64 nr0;          // memory BIOs at call entry: the read BIO's num_read,
    u64 nw0;          // the write BIO's num_write
    s32 fd;           // rule 1: the first nested socket fd; -1: none
    u32 seq_start;
    u32 seq_end;
    s32 last_fd;
    u32 last_seq_start;
    u8 op;
    u8 track_reads;   // this thread set a memory BIO: remember its socket reads
    u8 want_write;    // want_ssl is set
    u8 membio;        // nr0/nw0 were read
};
BPF_TASK_STORAGE(threads, struct thread_t);
#ifndef BPF_LOCAL_STORAGE_GET_F_CREATE
#define BPF_LOCAL_STORAGE_GET_F_CREATE 1
#endif

// The lasting map: an SSL* (in its process) -> its connection.
struct ssl_key_t { u32 tgid; u32 pad; u64 ssl; };
struct ssl_val_t {
    u64 id;
    u64 rbio;         // memory BIOs (SSL_set_bio outside SSL_set_fd); 0: a socket BIO
    u64 wbio;
    s32 fd;           // -1: not known (yet)
    u32 recv_base;    // stream position of the first byte read from rbio
    u32 send_base;    // and of the first written to wbio
    u8 have_recv_base;
    u8 have_send_base;
    u8 pad[2];
    u64 nr_exit;      // the read BIO's num_read when the last SSL call returned
};
BPF_HASH(ssl_conns, struct ssl_key_t, struct ssl_val_t, SSL_MAX);
BPF_ARRAY(conn_counter, u64, 1);

#define RD(dst, src) bpf_probe_read_kernel(&(dst), sizeof(dst), (void *)(src))

// The entry of an SSL*, created (fd unknown) if it has none; NULL only when full.
static __always_inline struct ssl_val_t *ssl_entry(struct ssl_key_t *k) {
    struct ssl_val_t *c = ssl_conns.lookup(k);
    if (c)
        return c;
    u32 zero = 0;
    u64 *ctr = conn_counter.lookup(&zero);
    if (!ctr)
        return 0;
    // Bit 62: never equal to a trace probe connection id (the spans stage keys
    // connections by process and id).
    struct ssl_val_t nv = {.id = (__sync_fetch_and_add(ctr, 1) + 1) | (1ULL << 62), .fd = -1};
    if (ssl_conns.update(k, &nv)) {
        stat_inc(ST_MAP_FULL);
        return 0;
    }
    return ssl_conns.lookup(k);
}

static __always_inline struct thread_t *thread_state(int create) {
    return threads.task_storage_get(bpf_get_current_task_btf(), 0,
                                    create ? BPF_LOCAL_STORAGE_GET_F_CREATE : 0);
}

// fd -> struct sock * of a TCP socket: 1, else 0 (not a TCP socket, or a read failed).
static __always_inline int fd_to_tcp_sk(s32 fd, u64 *out) {
    u64 task = bpf_get_current_task(), files = 0, fdt = 0, fdarr = 0, file = 0;
    u64 inode = 0, sock = 0, sk = 0;
    u32 max_fds = 0;
    u16 mode = 0, proto = 0;
    if (fd < 0 || RD(files, task + OFF_task_struct__files) || !files ||
        RD(fdt, files + OFF_files_struct__fdt) || !fdt ||
        RD(max_fds, fdt + OFF_fdtable__max_fds) || (u32)fd >= max_fds ||
        RD(fdarr, fdt + OFF_fdtable__fd) || !fdarr ||
        RD(file, fdarr + (u64)fd * 8) || !file ||
        RD(inode, file + OFF_file__f_inode) || RD(mode, inode + OFF_inode__i_mode))
        return 0;
    if ((mode & S_IFMT) != S_IFSOCK)
        return 0;
    if (RD(sock, file + OFF_file__private_data) || RD(sk, sock + OFF_socket__sk) || !sk ||
        RD(proto, sk + OFF_sock__sk_protocol) || proto != IPPROTO_TCP)
        return 0;
    *out = sk;
    return 1;
}

// Family, addresses and ports of a TCP sock; 0 if it is IPv4/IPv6.
static __always_inline int read_sock(u64 sk, struct tls_event_t *e) {
    u64 skc = sk + OFF_sock____sk_common;
    u16 family = 0, dport = 0;
    if (RD(family, skc + OFF_sock_common__skc_family) ||
        RD(e->lport, skc + OFF_sock_common__skc_num) ||
        RD(dport, skc + OFF_sock_common__skc_dport)) {
        stat_inc(ST_READ_FAIL);
        return -1;
    }
    e->family = family;
    e->rport = bpf_ntohs(dport);
    __builtin_memset(e->laddr, 0, 16);
    __builtin_memset(e->raddr, 0, 16);
    if (family == AF_INET) {
        RD(*(u32 *)e->laddr, skc + OFF_sock_common__skc_rcv_saddr);
        RD(*(u32 *)e->raddr, skc + OFF_sock_common__skc_daddr);
    } else if (family == AF_INET6) {
        bpf_probe_read_kernel(e->laddr, 16, (void *)(skc + OFF_sock_common__skc_v6_rcv_saddr));
        bpf_probe_read_kernel(e->raddr, 16, (void *)(skc + OFF_sock_common__skc_v6_daddr));
    } else {
        return -1;
    }
    return 0;
}

// Batched wake-ups, as in the trace probe: a wake-up costs the writer ~20 us on a VM.
BPF_PERCPU_ARRAY(since_wakeup, u32, 1);

static __always_inline void submit(struct tls_event_t *e) {
    u32 len = e->payload_len & (PAYLOAD_MAX * 2 - 1);
    u64 flags = BPF_RB_NO_WAKEUP;
    u32 zero = 0;
    u32 *n = since_wakeup.lookup(&zero);
    if (n) {
        *n += EVENT_HDR + len;
        if (*n >= WAKEUP_BYTES) {
            *n = 0;
            flags = BPF_RB_FORCE_WAKEUP;
        }
    }
    if (tls_events.ringbuf_output(e, EVENT_HDR + len, flags))
        stat_inc(ST_RB_FULL);
    else
        stat_inc(ST_EVENTS);
}

static __always_inline struct tls_event_t *new_event(u8 kind) {
    u32 zero = 0;
    struct tls_event_t *e = scratch.lookup(&zero);
    if (!e)
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    e->pid = id >> 32;
    e->tid = (u32)id;
    e->kind = kind;
    e->op = 0;
    e->rule = RULE_NONE;
    e->flags = 0;
    e->fd = -1;
    e->ssl = 0;
    e->conn_id = 0;
    e->ret = 0;
    e->seq_start = 0;
    e->seq_end = 0;
    e->payload_len = 0;
    e->family = 0;
    e->lport = 0;
    e->rport = 0;
    e->ts_exit = bpf_ktime_get_ns();
    e->ts_enter = e->ts_exit;
    bpf_get_current_comm(e->comm, sizeof(e->comm));
    return e;
}

// -- the SSL calls ----------------------------------------------------------------------

static __always_inline int bio_counts(struct ssl_val_t *c, u64 *nr, u64 *nw) {
    return !bpf_probe_read_user(nr, sizeof(*nr), (void *)(c->rbio + BIO_NUM_READ)) &&
           !bpf_probe_read_user(nw, sizeof(*nw), (void *)(c->wbio + BIO_NUM_WRITE));
}

static __always_inline int call_enter(struct pt_regs *ctx, u8 op) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (tgid == SELF_TGID)
        return 0;
    struct thread_t *t = thread_state(1);
    if (!t) {
        stat_inc(ST_STATE_FAIL);
        return 0;
    }
    t->ssl = PT_REGS_PARM1(ctx);
    t->buf = PT_REGS_PARM2(ctx);
    t->ex_ptr = (op == OP_READ_EX || op == OP_WRITE_EX) ? PT_REGS_PARM4(ctx) : 0;
    t->op = op;
    t->fd = -1;
    t->sk = 0;
    t->membio = 0;
    struct ssl_key_t k = {.tgid = tgid, .ssl = t->ssl};
    struct ssl_val_t *c = ssl_conns.lookup(&k);
    if (c && c->rbio && c->wbio && bio_counts(c, &t->nr0, &t->nw0)) {
        t->membio = 1;
        // Ciphertext read from the read BIO between SSL calls was taken by the
        // application and is fed back (gRPC hands the bytes left after the handshake to
        // its record protector): counted twice, so the stream's start moves back by it.
        if (c->have_recv_base && t->nr0 > c->nr_exit) {
            c->recv_base -= (u32)(t->nr0 - c->nr_exit);
            c->nr_exit = t->nr0;
        }
    }
    t->ts = bpf_ktime_get_ns();
    return 0;
}

static __always_inline u32 copy_plain(struct tls_event_t *e, u64 src, u64 len) {
    u64 n = len < PAYLOAD_CAP ? len : PAYLOAD_CAP;
    // Bounds the verifier can follow on 6.1 as on 6.18 (the trace probe's copy_user).
    asm volatile("" : "+r"(n));
    if (n == 0 || n > PAYLOAD_MAX)
        return 0;
    asm volatile("" : "+r"(n));
    n = ((n - 1) & (PAYLOAD_MAX - 1)) + 1;
    if (bpf_probe_read_user(e->payload, n, (void *)src)) {
        stat_inc(ST_READ_FAIL);
        return 0;
    }
    return n;
}

static __always_inline int call_exit(struct pt_regs *ctx) {
    struct thread_t *t = thread_state(0);
    if (!t || !t->ssl)
        return 0;
    u64 ssl = t->ssl;
    u8 op = t->op;
    t->ssl = 0;  // whatever happens below, the call is over
    struct ssl_key_t k = {.tgid = bpf_get_current_pid_tgid() >> 32, .ssl = ssl};
    struct ssl_val_t *c = ssl_entry(&k);
    if (!c)
        return 0;
    if (t->fd >= 0 && c->fd < 0)
        c->fd = t->fd;                       // rule 1 feeds rule 2 (handshakes too)
    u64 nr1 = 0, nw1 = 0;
    u8 membio = t->membio && bio_counts(c, &nr1, &nw1);
    if (membio) {
        c->nr_exit = nr1;
        // Rule 3 learns: the first ciphertext this SSL* consumed came from the thread's
        // last socket read; the first it produced leaves in the thread's next write.
        if (!c->have_recv_base && t->nr0 == 0 && nr1 > 0 && t->last_sk &&
            bpf_ktime_get_ns() - t->last_ts <= NEIGHBOUR_NS) {
            c->recv_base = t->last_seq_start;
            c->have_recv_base = 1;
            if (c->fd < 0)
                c->fd = t->last_fd;
        }
        if (!c->have_send_base && t->nw0 == 0 && nw1 > 0) {
            t->want_write = 1;
            t->want_ssl = ssl;
        }
    }
    if (op == OP_HANDSHAKE)
        return 0;
    // All four return an int: -1 (want read/write, error) is 0xffffffff in rax.
    s32 rc = (s32)PT_REGS_RC(ctx);
    u64 n = 0;
    if (op == OP_READ_EX || op == OP_WRITE_EX) {
        if (rc != 1 || !t->ex_ptr || bpf_probe_read_user(&n, sizeof(n), (void *)t->ex_ptr))
            return 0;
    } else {
        if (rc <= 0)
            return 0;
        n = rc;
    }
    if (n == 0)
        return 0;
    u8 writing = op == OP_WRITE || op == OP_WRITE_EX;
    struct tls_event_t *e = new_event(EV_DATA);
    if (!e)
        return 0;
    u64 sk = 0;
    if (t->fd >= 0) {                        // 1. nested socket call
        e->rule = RULE_NESTED;
        e->fd = t->fd;
        sk = t->sk;
        e->seq_start = t->seq_start;
        e->seq_end = t->seq_end;
        e->flags |= F_SEQ;
        stat_inc(ST_NESTED);
    } else if (c->fd >= 0) {                 // 2. the lasting map; 3. memory BIOs
        if (!fd_to_tcp_sk(c->fd, &sk)) {
            stat_inc(ST_NOT_TCP);
            return 0;
        }
        e->fd = c->fd;
        if (membio) {
            e->rule = RULE_NEIGHBOUR;
            stat_inc(ST_NEIGHBOUR);
            if (!writing && c->have_recv_base && nr1 > t->nr0) {
                e->seq_start = c->recv_base + (u32)t->nr0;
                e->seq_end = c->recv_base + (u32)nr1;
                e->flags |= F_SEQ;
            } else if (writing && c->have_send_base && nw1 > t->nw0) {
                e->seq_start = c->send_base + (u32)t->nw0;
                e->seq_end = c->send_base + (u32)nw1;
                e->flags |= F_SEQ;
            }
        } else {
            e->rule = RULE_SSL_MAP;
            stat_inc(ST_SSL_MAP);
        }
    } else {
        stat_inc(writing ? ST_UNMAPPED_WRITE : ST_UNMAPPED_READ);
        return 0;
    }
    if (read_sock(sk, e))
        return 0;
    e->ts_enter = t->ts;
    e->ssl = ssl;
    e->conn_id = c->id;
    e->op = op;
    e->ret = n;
    e->payload_len = copy_plain(e, t->buf, n);
    if (n > PAYLOAD_CAP)
        e->flags |= F_TRUNC;
    submit(e);
    return 0;
}

int ssl_read_enter(struct pt_regs *ctx) { return call_enter(ctx, OP_READ); }
int ssl_write_enter(struct pt_regs *ctx) { return call_enter(ctx, OP_WRITE); }
int ssl_read_ex_enter(struct pt_regs *ctx) { return call_enter(ctx, OP_READ_EX); }
int ssl_write_ex_enter(struct pt_regs *ctx) { return call_enter(ctx, OP_WRITE_EX); }
int ssl_handshake_enter(struct pt_regs *ctx) { return call_enter(ctx, OP_HANDSHAKE); }
int ssl_call_exit(struct pt_regs *ctx) { return call_exit(ctx); }

// SSL_set_fd(ssl, fd): the lasting map learns the fd.
int ssl_set_fd_enter(struct pt_regs *ctx) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (tgid == SELF_TGID)
        return 0;
    struct ssl_key_t k = {.tgid = tgid, .ssl = PT_REGS_PARM1(ctx)};
    struct ssl_val_t *c = ssl_entry(&k);
    if (c) {
        c->fd = (s32)PT_REGS_PARM2(ctx);
        c->rbio = 0;
        c->wbio = 0;
    }
    struct thread_t *t = thread_state(1);
    if (t)
        t->set_fd_ssl = k.ssl;
    return 0;
}

// SSL_set_bio(ssl, rbio, wbio) outside SSL_set_fd: BIOs of the application's own. Their
// counters serve rule 3, and this thread's socket reads are remembered from now on. (A
// socket BIO of the application's, as curl's, is served by rule 1 first.)
int ssl_set_bio_enter(struct pt_regs *ctx) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (tgid == SELF_TGID)
        return 0;
    struct thread_t *t = thread_state(1);
    if (!t)
        return 0;
    struct ssl_key_t k = {.tgid = tgid, .ssl = PT_REGS_PARM1(ctx)};
    if (t->set_fd_ssl == k.ssl) {
        t->set_fd_ssl = 0;
        return 0;
    }
    t->track_reads = 1;
    struct ssl_val_t *c = ssl_entry(&k);
    if (c) {
        c->rbio = PT_REGS_PARM2(ctx);
        c->wbio = PT_REGS_PARM3(ctx);
        c->fd = -1;
        c->have_recv_base = 0;
        c->have_send_base = 0;
        c->nr_exit = 0;
    }
    return 0;
}

// SSL_free: the connection's end for the spans stage; the SSL* may be reused.
int ssl_free_enter(struct pt_regs *ctx) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct ssl_key_t k = {.tgid = tgid, .ssl = PT_REGS_PARM1(ctx)};
    struct ssl_val_t *c = ssl_conns.lookup(&k);
    if (!c)
        return 0;
    u64 id = c->id;
    s32 fd = c->fd;
    ssl_conns.delete(&k);
    struct tls_event_t *e = new_event(EV_CLOSE);
    if (!e)
        return 0;
    e->conn_id = id;
    e->fd = fd;
    e->ssl = k.ssl;
    submit(e);
    return 0;
}

// The dynamic loader calls _dl_debug_state after every change to a process's link map
// (start-up and dlopen): user space then rescans that process's mappings for libraries
// that export SSL_write.
int dl_debug_state(struct pt_regs *ctx) {
    if ((bpf_get_current_pid_tgid() >> 32) == SELF_TGID)
        return 0;
    struct tls_event_t *e = new_event(EV_LOADED);
    if (e)
        submit(e);
    return 0;
}

// -- the socket calls under them ----------------------------------------------------------

struct exit_ctx { u64 common; s32 nr; u32 pad; s64 ret; };

static __always_inline int sock_exit(void *ctx, u8 dir) {
    struct exit_ctx *x = ctx;
    s64 ret = x->ret;
    if (ret <= 0)
        return 0;
    // Threads that never called SSL have no storage: one lookup and out (~80 ns of
    // program run time here, bpf_stats' own clock reads included).
    struct thread_t *t = thread_state(0);
    if (!t)
        return 0;
    if (t->ssl) {
        u8 writing = t->op == OP_WRITE || t->op == OP_WRITE_EX;
        if (t->op != OP_HANDSHAKE && writing != (dir == DIR_EGRESS))
            return 0;  // e.g. a key update read inside SSL_write
    } else if (dir == DIR_INGRESS ? !t->track_reads : !t->want_write) {
        return 0;
    }
    char *regs = (char *)bpf_task_pt_regs(bpf_get_current_task_btf());
    if (!regs)
        return 0;
    s32 fd = (s32)*(u64 *)(regs + OFF_pt_regs__di);
    u64 sk = 0;
    if (!fd_to_tcp_sk(fd, &sk))
        return 0;
    u32 after = 0;
    if (RD(after, sk + (dir == DIR_EGRESS ? OFF_tcp_sock__write_seq : OFF_tcp_sock__copied_seq))) {
        stat_inc(ST_READ_FAIL);
        return 0;
    }
    u32 before = after - (u32)ret;
    if (t->ssl) {
        if (t->fd < 0) {
            t->fd = fd;
            t->sk = sk;
            t->seq_start = before;
        }
        if (fd == t->fd)
            t->seq_end = after;
        return 0;
    }
    if (dir == DIR_INGRESS) {
        t->last_fd = fd;
        t->last_sk = sk;
        t->last_ts = bpf_ktime_get_ns();
        t->last_seq_start = before;
        return 0;
    }
    t->want_write = 0;
    struct ssl_key_t k = {.tgid = bpf_get_current_pid_tgid() >> 32, .ssl = t->want_ssl};
    struct ssl_val_t *c = ssl_conns.lookup(&k);
    if (c && !c->have_send_base) {
        // The stream's start is where this write ends less all the write BIO produced so
        // far, not this write's start: the first bytes may have left from another thread
        // (gRPC's poller sends the ClientHello, the handshaking thread the Finished).
        u64 nw = 0;
        if (c->wbio && !bpf_probe_read_user(&nw, sizeof(nw), (void *)(c->wbio + BIO_NUM_WRITE)) &&
            nw >= (u64)ret)
            c->send_base = after - (u32)nw;
        else
            c->send_base = before;
        c->have_send_base = 1;
        if (c->fd < 0)
            c->fd = fd;
    }
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_read) { return sock_exit(args, DIR_INGRESS); }
TRACEPOINT_PROBE(syscalls, sys_exit_readv) { return sock_exit(args, DIR_INGRESS); }
TRACEPOINT_PROBE(syscalls, sys_exit_recvfrom) { return sock_exit(args, DIR_INGRESS); }
TRACEPOINT_PROBE(syscalls, sys_exit_recvmsg) { return sock_exit(args, DIR_INGRESS); }
TRACEPOINT_PROBE(syscalls, sys_exit_write) { return sock_exit(args, DIR_EGRESS); }
TRACEPOINT_PROBE(syscalls, sys_exit_writev) { return sock_exit(args, DIR_EGRESS); }
TRACEPOINT_PROBE(syscalls, sys_exit_sendto) { return sock_exit(args, DIR_EGRESS); }
TRACEPOINT_PROBE(syscalls, sys_exit_sendmsg) { return sock_exit(args, DIR_EGRESS); }
