// gotls.bpf.c: Go crypto/tls plaintext, compiled after tls.bpf.c in the same program
// (probe.py appends it), so it emits the same struct tls_event_t into the same ring and
// shares its helpers (new_event, submit, fd_to_tcp_sk, read_sock, copy_plain) and its
// (tgid, SSL*) -> connection map, keyed here by the *tls.Conn.
//
// Uprobes on crypto/tls.(*Conn).Write and .Read at entry and at each of their `ret`
// instructions (golang.py finds them): a uretprobe rewrites the return address on the
// goroutine's stack, which Go moves when it grows, so it crashes Go programs. Go >= 1.17
// register ABI: receiver in RAX, the slice in RBX (ptr) and RCX (len), n returned in RAX,
// and R14 always holds the current goroutine (g). A goroutine can change threads while it
// blocks inside Read/Write, so the call in progress is keyed by (tgid, g), not by thread.
//
// The connection comes from the Go structs, at offsets golang.py reads from the binary's
// DWARF and sends per binary in go_cfgs: tls.Conn.conn (a net.Conn interface: itab, data),
// checked to hold a *net.TCPConn (its itab's address), -> conn.fd (*netFD) -> pfd.Sysfd.
// The ciphertext's TCP range is exact: a Write covers write_seq from entry to return (the
// Conn's write lock is held throughout); a Read covers copied_seq less the ciphertext
// still unread in tls.Conn.rawInput, from entry to return.
//
// A binary without DWARF (-ldflags=-w) has no offsets: its calls are mapped, as OpenSSL's
// socket BIOs are, by the read/write syscall made inside them, found at the syscall exit
// by the goroutine in the user registers' R14 (nested); a Read served from the Conn's
// buffer made none and takes the fd the Conn last used (conn_map, no TCP range); the
// handshake (its syscalls, same rule) tells the fd before the first Read, which is often
// served from what the handshake's last read brought.

// Ops continue tls.bpf.c's (OP_HANDSHAKE is 5): both write the same struct, so a number
// names one call; decoder.py's OP_IDS mirrors both enums.
enum { OP_GO_READ = 6, OP_GO_WRITE = 7, OP_GO_HANDSHAKE = 8 };  // the last one not sent
enum { RULE_GO_CONN = 4, RULE_GO_NESTED, RULE_GO_CONN_MAP };
#define GO_CFG_NESTED 1

// golang.py's GO_STAT_NAMES mirrors this enum.
enum { GS_CALLS = 0, GS_UNCONFIGURED, GS_NOT_TCPCONN, GS_NOT_TCP, GS_READ_FAIL,
       GS_CALLS_FULL, GS_NO_ENTRY, GS_NO_BYTES, GS_NESTED, GS_CONN_MAP, GS_UNMAPPED,
       GS_FLUSHED, GS_NSTATS };
BPF_PERCPU_ARRAY(go_stats, u64, GS_NSTATS);

static __always_inline void go_stat(u32 idx) {
    u64 *v = go_stats.lookup(&idx);
    if (v) *v += 1;
}

// Per binary: where the fields are. Key: the function's run-time address; tgid 0 for a
// fixed-address executable (all its processes share it), the process for a PIE one.
struct go_cfg_key_t { u32 tgid; u32 pad; u64 ip; };
struct go_cfg_t {
    u64 itab;       // run-time address of go:itab.*net.TCPConn,net.Conn
    u32 conn;       // tls.Conn.conn
    u32 netfd;      // net.TCPConn.conn.fd
    u32 sysfd;      // net.netFD.pfd.Sysfd
    u32 raw_len;    // tls.Conn.rawInput.buf's length word
    u32 raw_off;    // tls.Conn.rawInput.off
    u32 flags;      // GO_CFG_NESTED: no offsets, map by the nested syscall
};
BPF_HASH(go_cfgs, struct go_cfg_key_t, struct go_cfg_t, 4096);

struct go_call_key_t { u32 tgid; u32 pad; u64 g; };
struct go_call_t {
    u64 conn;       // *tls.Conn
    u64 buf;
    u64 ts;
    u64 sk;
    u32 raw_len;    // 0 for writes
    u32 raw_off;
    u32 seq;        // the ciphertext's TCP position at entry (nested: first syscall's)
    u32 seq_end;    // nested: where the last nested syscall ended
    u64 len;        // len(b)
    s32 fd;         // nested: -1 until a nested syscall names it
    u8 op;
    u8 nested;
    u8 emitted;     // a write sent early by a Read (go_flush_write)
    u8 pad;
};
BPF_HASH(go_calls, struct go_call_key_t, struct go_call_t, SSL_MAX);
// Nested-mode calls in progress: while 0 the syscall programs return at once. A goroutine
// that dies inside a call leaves it high, which costs only that lookup per syscall.
BPF_ARRAY(go_nested_calls, s64, 1);
// (tgid, *tls.Conn) -> the goroutine inside its Write, for go_flush_write.
BPF_HASH(go_writing, struct ssl_key_t, u64, SSL_MAX);

// Processes whose binary has no go_cfgs entry yet (a PIE binary's new process): user
// space is asked once a second per process to look at it (EV_LOADED).
BPF_TABLE("lru_hash", u32, u64, go_asked, 1024);

#define URD(dst, src) bpf_probe_read_user(&(dst), sizeof(dst), (void *)(src))

static __always_inline void go_ask(u32 tgid) {
    u64 now = bpf_ktime_get_ns();
    u64 *last = go_asked.lookup(&tgid);
    if (last && now - *last < 1000000000ULL)
        return;
    go_asked.update(&tgid, &now);
    struct tls_event_t *e = new_event(EV_LOADED);
    if (e)
        submit(e);
}

// TCP position of the ciphertext the call starts at (entry) or ends at (return).
static __always_inline int go_seq(struct go_call_t *c, u32 *out) {
    u32 seq = 0;
    if (c->op == OP_GO_WRITE)
        return RD(*out, c->sk + OFF_tcp_sock__write_seq);
    if (RD(seq, c->sk + OFF_tcp_sock__copied_seq))
        return -1;
    s64 len = 0, off = 0;  // bytes read from the socket but not yet decrypted
    if (URD(len, c->conn + c->raw_len) || URD(off, c->conn + c->raw_off))
        return -1;
    *out = seq - (u32)(len - off);
    return 0;
}

static __always_inline int go_store(struct go_call_key_t *k, struct go_call_t *c) {
    if (go_calls.update(k, c)) {
        go_stat(GS_CALLS_FULL);
        return -1;
    }
    if (c->op == OP_GO_WRITE) {
        struct ssl_key_t wk = {.tgid = k->tgid, .ssl = c->conn};
        go_writing.update(&wk, &k->g);
    }
    return 0;
}

static __always_inline int go_enter(struct pt_regs *ctx, u8 op) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (tgid == SELF_TGID)
        return 0;
    struct go_cfg_key_t ck = {.tgid = 0, .ip = PT_REGS_IP(ctx)};
    struct go_cfg_t *cfg = go_cfgs.lookup(&ck);
    if (!cfg) {
        ck.tgid = tgid;
        cfg = go_cfgs.lookup(&ck);
        if (!cfg) {
            go_stat(GS_UNCONFIGURED);
            go_ask(tgid);
            return 0;
        }
    }
    struct go_call_t c = {.conn = ctx->ax, .buf = ctx->bx, .len = ctx->cx, .op = op, .fd = -1};
    struct go_call_key_t k = {.tgid = tgid, .g = ctx->r14};
    if (cfg->flags & GO_CFG_NESTED) {
        c.nested = 1;
        c.ts = bpf_ktime_get_ns();
        struct go_call_t *old = go_calls.lookup(&k);
        // Read and Write call handshakeContext first (it returns at once once done):
        // that one is part of the call in progress.
        if (op == OP_GO_HANDSHAKE && old && old->op != OP_GO_HANDSHAKE)
            return 0;
        // Entered again after growing its stack (morestack): the same call, counted once.
        u8 again = old && old->nested && old->conn == c.conn && old->op == op;
        if (go_store(&k, &c))
            return 0;
        u32 zero = 0;
        s64 *active = go_nested_calls.lookup(&zero);
        if (active && !again)
            __sync_fetch_and_add(active, 1);
        return 0;
    }
    u64 itab = 0, data = 0, netfd = 0;
    s64 sysfd = -1;
    if (URD(itab, c.conn + cfg->conn) || URD(data, c.conn + cfg->conn + 8)) {
        go_stat(GS_READ_FAIL);
        return 0;
    }
    if (cfg->itab && itab != cfg->itab) {
        go_stat(GS_NOT_TCPCONN);  // e.g. a tls.Conn over a pipe or a wrapped net.Conn
        return 0;
    }
    if (URD(netfd, data + cfg->netfd) || URD(sysfd, netfd + cfg->sysfd)) {
        go_stat(GS_READ_FAIL);
        return 0;
    }
    if (!fd_to_tcp_sk((s32)sysfd, &c.sk)) {
        go_stat(GS_NOT_TCP);
        return 0;
    }
    c.fd = (s32)sysfd;
    if (op == OP_GO_READ) {
        c.raw_len = cfg->raw_len;
        c.raw_off = cfg->raw_off;
    }
    if (go_seq(&c, &c.seq)) {
        go_stat(GS_READ_FAIL);
        return 0;
    }
    c.ts = bpf_ktime_get_ns();
    go_store(&k, &c);
    return 0;
}

// Maps a call to its socket and TCP range and sends its record (n: plaintext bytes).
static __always_inline int go_emit(struct go_call_t *c, u32 tgid, u8 op, s64 n) {
    struct ssl_key_t sk = {.tgid = tgid, .ssl = c->conn};
    struct ssl_val_t *v = ssl_conns.lookup(&sk);
    u8 rule = RULE_GO_CONN, has_seq = 0;
    u32 end = 0;
    if (!c->nested) {
        if (go_seq(c, &end)) {
            go_stat(GS_READ_FAIL);
            return 0;
        }
        has_seq = end != c->seq;  // a Read served from decrypted plaintext moved none
    } else if (c->fd >= 0) {
        rule = RULE_GO_NESTED;
        end = c->seq_end;
        has_seq = 1;
        go_stat(GS_NESTED);
    } else if (v && v->fd >= 0 && fd_to_tcp_sk(v->fd, &c->sk)) {
        rule = RULE_GO_CONN_MAP;  // e.g. a Read served from the Conn's buffer
        c->fd = v->fd;
        go_stat(GS_CONN_MAP);
    } else {
        go_stat(GS_UNMAPPED);
        return 0;
    }
    struct tls_event_t *e = new_event(EV_DATA);
    if (!e)
        return 0;
    // The connection id: one per *tls.Conn and socket (a freed Conn's address is reused;
    // tls.bpf.c's ssl_entry hands out the ids).
    if (v && v->fd >= 0 && v->fd != c->fd) {
        ssl_conns.delete(&sk);
        v = 0;
    }
    if (!v)
        v = ssl_entry(&sk);
    if (!v)
        return 0;
    v->fd = c->fd;
    if (read_sock(c->sk, e))
        return 0;
    e->rule = rule;
    e->fd = c->fd;
    e->ssl = c->conn;
    e->conn_id = v->id;
    e->op = op;
    e->ret = n;
    e->ts_enter = c->ts;
    if (has_seq) {
        e->seq_start = c->seq;
        e->seq_end = end;
        e->flags |= F_SEQ;
    }
    e->payload_len = copy_plain(e, c->buf, n);
    if (n > PAYLOAD_CAP)
        e->flags |= F_TRUNC;
    go_stat(GS_CALLS);
    submit(e);
    return 0;
}

// A Read returning while a Write on the same Conn has not: Go's HTTP/1 client writes and
// reads on two goroutines, and the writer may run its `ret` after the reader got the
// answer. The write is sent first, from here, once its ciphertext is on the wire, so that
// records of a connection arrive in the order their bytes moved.
static __always_inline void go_flush_write(u32 tgid, u64 conn) {
    struct ssl_key_t wk = {.tgid = tgid, .ssl = conn};
    u64 *wg = go_writing.lookup(&wk);
    if (!wg)
        return;
    struct go_call_key_t gk = {.tgid = tgid, .g = *wg};
    struct go_call_t *w = go_calls.lookup(&gk);
    if (!w || w->op != OP_GO_WRITE || w->conn != conn || w->emitted)
        return;
    u32 now = 0;
    if (w->nested ? w->fd < 0 : (go_seq(w, &now) || now == w->seq))
        return;  // nothing sent yet
    struct go_call_t copy = *w;
    w->emitted = 1;
    go_stat(GS_FLUSHED);
    go_emit(&copy, tgid, OP_GO_WRITE, (s64)copy.len);
}

static __always_inline int go_return(struct pt_regs *ctx, u8 op) {
    u64 id = bpf_get_current_pid_tgid();
    struct go_call_key_t k = {.tgid = id >> 32, .g = ctx->r14};
    struct go_call_t *cp = go_calls.lookup(&k);
    if (!cp || cp->op != op) {
        if (op != OP_GO_HANDSHAKE)  // see go_enter: a handshake inside a Read/Write
            go_stat(GS_NO_ENTRY);
        return 0;
    }
    struct go_call_t c = *cp;
    go_calls.delete(&k);
    if (c.nested) {
        u32 zero = 0;
        s64 *active = go_nested_calls.lookup(&zero);
        if (active)
            __sync_fetch_and_add(active, -1);
    }
    if (op == OP_GO_HANDSHAKE) {  // nested mode only: the Conn's fd, no record
        struct ssl_key_t sk = {.tgid = k.tgid, .ssl = c.conn};
        struct ssl_val_t *v = ssl_conns.lookup(&sk);
        if (c.fd < 0 || (v && v->fd == c.fd))
            return 0;
        if (v)
            ssl_conns.delete(&sk);  // a freed Conn's address, reused
        v = ssl_entry(&sk);
        if (v)
            v->fd = c.fd;
        return 0;
    }
    if (op == OP_GO_WRITE) {
        struct ssl_key_t wk = {.tgid = k.tgid, .ssl = c.conn};
        u64 *wg = go_writing.lookup(&wk);
        if (wg && *wg == k.g)
            go_writing.delete(&wk);
        if (c.emitted)
            return 0;
    }
    s64 n = (s64)PT_REGS_RC(ctx);
    if (n <= 0) {
        go_stat(GS_NO_BYTES);
        return 0;
    }
    if (op == OP_GO_READ)
        go_flush_write(k.tgid, c.conn);
    return go_emit(&c, k.tgid, op, n);
}

int go_write_enter(struct pt_regs *ctx) { return go_enter(ctx, OP_GO_WRITE); }
int go_read_enter(struct pt_regs *ctx) { return go_enter(ctx, OP_GO_READ); }
int go_write_return(struct pt_regs *ctx) { return go_return(ctx, OP_GO_WRITE); }
int go_read_return(struct pt_regs *ctx) { return go_return(ctx, OP_GO_READ); }
int go_handshake_enter(struct pt_regs *ctx) { return go_enter(ctx, OP_GO_HANDSHAKE); }
int go_handshake_return(struct pt_regs *ctx) { return go_return(ctx, OP_GO_HANDSHAKE); }

// (*Conn).Close: the connection's end, as SSL_free is for OpenSSL.
int go_close_enter(struct pt_regs *ctx) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct ssl_key_t k = {.tgid = tgid, .ssl = ctx->ax};
    struct ssl_val_t *v = ssl_conns.lookup(&k);
    if (!v)
        return 0;
    u64 id = v->id;
    s32 fd = v->fd;
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

// Every exec asks user space to look at the new program: Go binaries are mostly static
// (no loader to trigger _dl_debug_state), and a binary must be attached before its first
// TLS call to be traced from the start.
TRACEPOINT_PROBE(sched, sched_process_exec) {
    if ((bpf_get_current_pid_tgid() >> 32) == SELF_TGID)
        return 0;
    struct tls_event_t *e = new_event(EV_LOADED);
    if (e)
        submit(e);
    return 0;
}

// Nested mode: a read/write syscall inside a Go call of its direction, found by the
// goroutine (R14 at the syscall) and the process. Go's net package moves a TCP stream with
// read and write only. Attached by golang.py when it first meets a binary without DWARF.
static __always_inline int go_sock_exit(void *ctx, u8 op) {
    u32 zero = 0;
    s64 *active = go_nested_calls.lookup(&zero);
    if (!active || *active <= 0)
        return 0;
    struct exit_ctx *x = ctx;
    s64 ret = x->ret;
    if (ret <= 0)
        return 0;
    char *regs = (char *)bpf_task_pt_regs(bpf_get_current_task_btf());
    if (!regs)
        return 0;
    struct go_call_key_t k = {.tgid = bpf_get_current_pid_tgid() >> 32,
                              .g = *(u64 *)(regs + OFF_pt_regs__r14)};
    struct go_call_t *c = go_calls.lookup(&k);
    if (!c || !c->nested || (c->op != op && c->op != OP_GO_HANDSHAKE))
        return 0;
    s32 fd = (s32)*(u64 *)(regs + OFF_pt_regs__di);
    u64 sk = c->sk;
    if (c->fd >= 0 ? fd != c->fd : !fd_to_tcp_sk(fd, &sk))
        return 0;
    u32 after = 0;
    if (RD(after, sk + (op == OP_GO_WRITE ? OFF_tcp_sock__write_seq : OFF_tcp_sock__copied_seq))) {
        go_stat(GS_READ_FAIL);
        return 0;
    }
    if (c->fd < 0) {
        c->fd = fd;
        c->sk = sk;
        c->seq = after - (u32)ret;
    }
    c->seq_end = after;
    return 0;
}

int go_sys_exit_read(void *ctx) { return go_sock_exit(ctx, OP_GO_READ); }
int go_sys_exit_write(void *ctx) { return go_sock_exit(ctx, OP_GO_WRITE); }
