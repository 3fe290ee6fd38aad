// network.bpf.c: TCP connection lifecycle (like BCC's tcplife), retransmits, resets,
// smoothed RTT, and bytes per process over TCP and UDP.
//
// Tracepoints (the project's kernel has no kprobes):
//   sock:inet_sock_set_state  birth (first state change), owner, and the CLOSE record
//   sock:sock_send_length, sock:sock_recv_length  bytes per process (process context,
//                             after every sendmsg/recvmsg on any socket), and the owner of
//                             accepted connections (their first send/recv); Linux >= 6.3.
//                             Before, kprobes on inet(6)_sendmsg/recvmsg where the kernel
//                             has them (IO_KPROBES), else no bytes per process.
//   tcp:tcp_retransmit_skb, tcp:tcp_send_reset, tcp:tcp_receive_reset
// `args->` fields come from the tracefs format files. The only kernel struct read is the
// socket at skaddr when it reaches CLOSE: tcp_sock (bytes_received, bytes_acked, srtt_us,
// total_retrans, snd_una, write_seq) and sock_common.skc_flags, at BTF offsets passed in
// as OFF_<struct>__<member>.
//
// Bytes: tcp_sock.bytes_acked and bytes_received count sequence space, so they include
// the SYN of an active open (acked) and FINs. The record carries data bytes:
//   sent     = bytes_acked - [our SYN was acked] - [our FIN was acked]
//   received = bytes_received - [the peer's FIN was received]
// Our SYN was acked: we saw SYN_SENT -> ESTABLISHED. Our FIN was sent: we saw it enter
// FIN_WAIT1 or LAST_ACK (tcp_close_state + tcp_send_fin); acked: snd_una == write_seq
// (the FIN is the last sequence number). The peer's FIN: tcp_fin() set SOCK_DONE.
//
// Compile-time knobs (set by probe.py): CONN_MAX, PROC_MAX, RINGBUF_PAGES, NSLOTS,
// SELF_TGID, SOCK_DONE_BIT (enum sock_flags, from BTF), SOCK_IO_TP, IO_KPROBES.

// tcp:tcp_send_reset's format names `enum sk_rst_reason`, which the (older) headers BCC
// compiles against lack; BCC's generated args struct needs it complete. Only its size (4,
// per the format file) matters: we never read the field.
enum sk_rst_reason { SK_RST_REASON_DEEPTRACE_UNUSED = 0x7fffffff };

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define MSG_PEEK 2

enum { TCP_ESTABLISHED = 1, TCP_SYN_SENT, TCP_SYN_RECV, TCP_FIN_WAIT1, TCP_FIN_WAIT2,
       TCP_TIME_WAIT, TCP_CLOSE, TCP_CLOSE_WAIT, TCP_LAST_ACK, TCP_LISTEN, TCP_CLOSING,
       TCP_NEW_SYN_RECV };

// How the owner of a connection was found; decoder.py mirrors this table.
enum { OWN_NONE = 0, OWN_CONNECT, OWN_IO, OWN_CLOSE };
#define F_SELF 1          // the agent's own connection: never reported
#define F_BIRTH 2         // birth seen: duration is known
#define F_SYN_ACKED 4     // active open completed: bytes_acked counts our SYN
#define F_FIN_SENT 8      // entered FIN_WAIT1/LAST_ACK: a FIN was queued after our data

// Counters by cause; decoder.py mirrors the names.
// ST_LOST_CLOSE: a new connection was born at the address of one whose CLOSE we never
// saw (the kernel dropped that event: recursion, or its perf recursion guard).
enum { ST_CLOSED = 0, ST_RB_FULL, ST_CONN_FULL, ST_PROC_FULL, ST_HIST_FULL,
       ST_READ_FAIL, ST_UNKNOWN_CONN, ST_RST_NO_SOCK, ST_LOST_CLOSE, ST_IO_ARGS_FULL,
       ST_NSTATS };
#include "deeptrace_core/stats.bpf.h"

struct conn_t {
    u64 birth_ns;
    u32 tgid;
    u32 retrans;
    u32 rst_sent;
    u32 rst_recv;
    u8 owner_src;
    u8 flags;
    u8 pad[2];
    char comm[16];
};
BPF_HASH(conns, u64, struct conn_t, CONN_MAX);

struct close_t {
    u64 ts_ns;          // CLOCK_MONOTONIC at CLOSE
    u64 birth_ns;       // 0: born before the probe attached
    u64 sk;
    u64 bytes_received;
    u64 bytes_acked;
    u32 tgid;
    u32 srtt_us;        // smoothed RTT in microseconds (srtt_us >> 3)
    u32 retrans;        // tcp_retransmit_skb events seen on it
    u32 total_retrans;  // the kernel's own lifetime count (tcp_sock.total_retrans)
    u32 rst_sent;
    u32 rst_recv;
    u16 sport;
    u16 dport;
    u16 family;
    u8 oldstate;
    u8 owner_src;
    u8 flags;
    u8 pad[7];
    u8 saddr[16];
    u8 daddr[16];
    char comm[16];
};
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);

// Per process: lifecycle counters.
struct proc_key_t { u32 tgid; u32 pad; char comm[16]; };
struct tcp_proc_t {
    u64 closed;           // connections closed
    u64 retrans;
    u64 rst_sent;
    u64 rst_recv;
    u64 bytes_received;   // of closed connections
    u64 bytes_acked;
};
BPF_HASH(tcp_procs, struct proc_key_t, struct tcp_proc_t, PROC_MAX);

// Per process, transport and direction: bytes through sendmsg/recvmsg.
struct io_key_t { u32 tgid; u8 proto; u8 dir; u8 pad[2]; char comm[16]; };
struct io_val_t { u64 bytes; u64 calls; };
BPF_HASH(proc_io, struct io_key_t, struct io_val_t, PROC_MAX);

// Global log2 histograms: smoothed RTT (us) and connection duration (us).
enum { H_SRTT = 0, H_DURATION };
struct hist_key_t { u32 kind; u32 slot; };
#include "deeptrace_core/log2hist.bpf.h"
BPF_HASH(hists, struct hist_key_t, struct hist_val_t, 4 * (NSLOTS + 1));

static __always_inline void hist_add(u32 kind, u64 v) {
    struct hist_key_t k = {.kind = kind, .slot = slot_of(v)};
    struct hist_val_t zero = {};
    hist_count_or_full(hists.lookup_or_try_init(&k, &zero), v, ST_HIST_FULL);
}

static __always_inline struct tcp_proc_t *tcp_proc(struct conn_t *c) {
    struct proc_key_t k = {.tgid = c ? c->tgid : 0};
    if (c)
        __builtin_memcpy(k.comm, c->comm, sizeof(k.comm));
    struct tcp_proc_t *p = tcp_procs.lookup(&k);
    if (!p) {
        struct tcp_proc_t zero = {};
        tcp_procs.insert(&k, &zero);
        p = tcp_procs.lookup(&k);
        if (!p)
            stat_inc(ST_PROC_FULL);
    }
    return p;
}

static __always_inline void set_owner(struct conn_t *c, u8 src) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    c->tgid = tgid;
    c->owner_src = src;
    bpf_get_current_comm(&c->comm, sizeof(c->comm));
    if (tgid == SELF_TGID)
        c->flags |= F_SELF;
}

// The entry of a TCP socket, created (birth unknown) when missing.
static __always_inline struct conn_t *conn_of(u64 sk) {
    struct conn_t *c = conns.lookup(&sk);
    if (c)
        return c;
    struct conn_t zero = {};
    conns.insert(&sk, &zero);
    c = conns.lookup(&sk);
    if (!c)
        stat_inc(ST_CONN_FULL);
    return c;
}

TRACEPOINT_PROBE(sock, inet_sock_set_state) {
    if (args->protocol != IPPROTO_TCP)
        return 0;
    int old = args->oldstate, new = args->newstate;
    u64 sk = (u64)args->skaddr;
    if (new == TCP_LISTEN || old == TCP_LISTEN && new == TCP_CLOSE)
        return 0;                           // listeners are not connections
    if (new == TCP_CLOSE) {
        // The connection's record: who, addresses, ports, duration, bytes both ways.
        struct conn_t *c = conns.lookup(&sk);
        struct conn_t cv = {};
        if (c) {
            cv = *c;
            conns.delete(&sk);
        } else {
            stat_inc(ST_UNKNOWN_CONN);      // opened before the probe attached
        }
        if (cv.flags & F_SELF)
            return 0;
        stat_inc(ST_CLOSED);
        u64 now = bpf_ktime_get_ns();
        u64 rx = 0, tx = 0, skflags = 0;
        u32 srtt = 0, total = 0, una = 0, wseq = 0;
        void *skp = (void *)sk;
        if (bpf_probe_read_kernel(&rx, sizeof(rx), skp + OFF_tcp_sock__bytes_received) ||
            bpf_probe_read_kernel(&tx, sizeof(tx), skp + OFF_tcp_sock__bytes_acked) ||
            bpf_probe_read_kernel(&srtt, sizeof(srtt), skp + OFF_tcp_sock__srtt_us) ||
            bpf_probe_read_kernel(&total, sizeof(total), skp + OFF_tcp_sock__total_retrans) ||
            bpf_probe_read_kernel(&una, sizeof(una), skp + OFF_tcp_sock__snd_una) ||
            bpf_probe_read_kernel(&wseq, sizeof(wseq), skp + OFF_tcp_sock__write_seq) ||
            bpf_probe_read_kernel(&skflags, sizeof(skflags),
                                  skp + OFF_sock____sk_common + OFF_sock_common__skc_flags))
            stat_inc(ST_READ_FAIL);
        srtt >>= 3;
        // Sequence space -> data bytes (see the top of this file).
        if ((cv.flags & F_SYN_ACKED) && tx)
            tx -= 1;
        if ((cv.flags & F_FIN_SENT) && una == wseq && tx)
            tx -= 1;
        if ((skflags >> SOCK_DONE_BIT) & 1 && rx)
            rx -= 1;

        struct tcp_proc_t *p = tcp_proc(&cv);
        if (p) {
            __sync_fetch_and_add(&p->closed, 1);
            __sync_fetch_and_add(&p->bytes_received, rx);
            __sync_fetch_and_add(&p->bytes_acked, tx);
        }
        if (srtt)
            hist_add(H_SRTT, srtt);
        if (cv.flags & F_BIRTH)
            hist_add(H_DURATION, (now - cv.birth_ns) / 1000);

        struct close_t *e = events.ringbuf_reserve(sizeof(struct close_t));
        if (!e) {
            stat_inc(ST_RB_FULL);
            return 0;
        }
        e->ts_ns = now;
        e->birth_ns = (cv.flags & F_BIRTH) ? cv.birth_ns : 0;
        e->sk = sk;
        e->bytes_received = rx;
        e->bytes_acked = tx;
        e->tgid = cv.tgid;
        e->srtt_us = srtt;
        e->retrans = cv.retrans;
        e->total_retrans = total;
        e->rst_sent = cv.rst_sent;
        e->rst_recv = cv.rst_recv;
        e->sport = args->sport;
        e->dport = args->dport;
        e->family = args->family;
        e->oldstate = args->oldstate;
        e->owner_src = cv.owner_src;
        e->flags = cv.flags;
        __builtin_memset(e->pad, 0, sizeof(e->pad));
        if (args->family == AF_INET) {
            __builtin_memset(e->saddr, 0, sizeof(e->saddr));
            __builtin_memset(e->daddr, 0, sizeof(e->daddr));
            __builtin_memcpy(e->saddr, args->saddr, 4);
            __builtin_memcpy(e->daddr, args->daddr, 4);
        } else {
            __builtin_memcpy(e->saddr, args->saddr_v6, 16);
            __builtin_memcpy(e->daddr, args->daddr_v6, 16);
        }
        __builtin_memcpy(e->comm, cv.comm, sizeof(e->comm));
        // Nobody sleeps on this buffer: the probe drains it without waiting.
        events.ringbuf_submit(e, BPF_RB_NO_WAKEUP);
        return 0;
    }
    struct conn_t *c;
    if (new == TCP_SYN_SENT || old == TCP_LISTEN) {
        // Birth: connect() (in the caller's context), or a passive child cloned from its
        // listener (in softirq: its owner is the first process to send or receive).
        struct conn_t fresh = {.birth_ns = bpf_ktime_get_ns(), .flags = F_BIRTH};
        if (conns.lookup(&sk))
            stat_inc(ST_LOST_CLOSE);
        if (new == TCP_SYN_SENT)
            set_owner(&fresh, OWN_CONNECT);
        if (conns.update(&sk, &fresh))
            stat_inc(ST_CONN_FULL);
        return 0;
    }
    c = conn_of(sk);
    if (!c)
        return 0;
    if (old == TCP_SYN_SENT && new == TCP_ESTABLISHED)
        c->flags |= F_SYN_ACKED;
    if (new == TCP_FIN_WAIT1 || new == TCP_LAST_ACK) {
        // Entered only from close()/shutdown(), in the process, which then sends a FIN.
        c->flags |= F_FIN_SENT;
        if (c->owner_src == OWN_NONE)
            set_owner(c, OWN_CLOSE);
    }
    return 0;
}

static __always_inline int on_io(void *skp, u16 family, u16 protocol, int ret, int flags,
                                 u8 dir) {
    if (ret <= 0 || (family != AF_INET && family != AF_INET6))
        return 0;
    if (protocol != IPPROTO_TCP && protocol != IPPROTO_UDP)
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (tgid == SELF_TGID)
        return 0;
    if (protocol == IPPROTO_TCP) {
        u64 sk = (u64)skp;
        struct conn_t *c = conns.lookup(&sk);
        if (c && c->owner_src == OWN_NONE)
            set_owner(c, OWN_IO);
    }
    if (dir == 0 && (flags & MSG_PEEK))
        return 0;                           // peeked bytes stay in the queue
    struct io_key_t k = {.tgid = tgid, .proto = protocol, .dir = dir};
    bpf_get_current_comm(&k.comm, sizeof(k.comm));
    struct io_val_t *v = proc_io.lookup(&k);
    if (!v) {
        struct io_val_t zero = {};
        proc_io.insert(&k, &zero);
        v = proc_io.lookup(&k);
        if (!v) {
            stat_inc(ST_PROC_FULL);
            return 0;
        }
    }
    __sync_fetch_and_add(&v->bytes, ret);
    __sync_fetch_and_add(&v->calls, 1);
    return 0;
}

#if SOCK_IO_TP
TRACEPOINT_PROBE(sock, sock_recv_length) {
    return on_io(args->sk, args->family, args->protocol, args->ret, args->flags, 0);
}

TRACEPOINT_PROBE(sock, sock_send_length) {
    return on_io(args->sk, args->family, args->protocol, args->ret, args->flags, 1);
}
#elif IO_KPROBES
// Before Linux 6.3 there are no sock:sock_{send,recv}_length tracepoints. The same bytes
// pass through the IPv4/IPv6 socket layer's sendmsg/recvmsg (inet_*, inet6_*: every read,
// write, send* and recv* on such a socket, called through proto_ops, so never inlined):
// kprobes there, where the kernel has them (probe.py attaches these by name). The entry
// keeps the call's sock and recv flags for the return, which has the byte count.
// Registers at BTF offsets (x86-64: arguments in di, si, dx, cx; the return in ax), like
// every kernel struct here; a kprobe program may load its context directly.
#define REG(ctx, r) (*(u64 *)((char *)(ctx) + OFF_pt_regs__##r))
struct pt_regs;
struct io_arg_t { u64 sk; int flags; };
BPF_HASH(io_args, u64, struct io_arg_t, 16384);

static __always_inline int io_enter(struct pt_regs *ctx, int flags) {
    u64 sk = 0;
    if (bpf_probe_read_kernel(&sk, sizeof(sk), (void *)(REG(ctx, di) + OFF_socket__sk)))
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    struct io_arg_t a = {.sk = sk, .flags = flags};
    if (io_args.update(&id, &a))
        stat_inc(ST_IO_ARGS_FULL);   // this call's bytes go uncounted
    return 0;
}

static __always_inline int io_exit(struct pt_regs *ctx, u8 dir) {
    u64 id = bpf_get_current_pid_tgid();
    struct io_arg_t *a = io_args.lookup(&id);
    if (!a)
        return 0;
    u64 sk = a->sk;
    int flags = a->flags;
    io_args.delete(&id);
    u16 family = 0, protocol = 0;
    bpf_probe_read_kernel(&family, sizeof(family),
                          (void *)(sk + OFF_sock____sk_common + OFF_sock_common__skc_family));
    bpf_probe_read_kernel(&protocol, sizeof(protocol), (void *)(sk + OFF_sock__sk_protocol));
    return on_io((void *)sk, family, protocol, (int)REG(ctx, ax), flags, dir);
}

int io_send_enter(struct pt_regs *ctx) { return io_enter(ctx, 0); }
int io_recv_enter(struct pt_regs *ctx) { return io_enter(ctx, (int)REG(ctx, cx)); }
int io_send_exit(struct pt_regs *ctx) { return io_exit(ctx, 1); }
int io_recv_exit(struct pt_regs *ctx) { return io_exit(ctx, 0); }
#endif

// Not full connections: no entry is created for them (it would never be deleted).
static __always_inline int no_conn_state(int state) {
    return state == TCP_CLOSE || state == TCP_LISTEN || state == TCP_NEW_SYN_RECV ||
           state == TCP_TIME_WAIT;
}

TRACEPOINT_PROBE(tcp, tcp_retransmit_skb) {
    u64 sk = (u64)args->skaddr;
    struct conn_t *c = no_conn_state(args->state) ? conns.lookup(&sk) : conn_of(sk);
    if (c) {
        if (c->flags & F_SELF)
            return 0;
        __sync_fetch_and_add(&c->retrans, 1);
    }
    struct tcp_proc_t *p = tcp_proc(c);
    if (p)
        __sync_fetch_and_add(&p->retrans, 1);
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_send_reset) {
    // Resets sent without a socket (a SYN to a closed port), from a listener, a timewait
    // socket, or after CLOSE (close() with unread data) are not a tracked connection's:
    // they count for process "unknown" (tgid 0).
    u64 sk = (u64)args->skaddr;
    struct conn_t *c = sk ? conns.lookup(&sk) : 0;
    if (!sk)
        stat_inc(ST_RST_NO_SOCK);
    if (c) {
        if (c->flags & F_SELF)
            return 0;
        __sync_fetch_and_add(&c->rst_sent, 1);
    }
    struct tcp_proc_t *p = tcp_proc(c);
    if (p)
        __sync_fetch_and_add(&p->rst_sent, 1);
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_receive_reset) {
    u64 sk = (u64)args->skaddr;
    struct conn_t *c = conn_of(sk);
    if (c) {
        if (c->flags & F_SELF)
            return 0;
        __sync_fetch_and_add(&c->rst_recv, 1);
    }
    struct tcp_proc_t *p = tcp_proc(c);
    if (p)
        __sync_fetch_and_add(&p->rst_recv, 1);
    return 0;
}
