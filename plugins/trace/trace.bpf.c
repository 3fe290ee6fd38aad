// trace.bpf.c: socket system calls -> one record per completed call on a TCP/UDP socket.
//
// Hooks syscall tracepoints only (this kernel has no kprobes): enter and exit of egress and
// control calls, only the exit of ingress calls (args_at_exit). Every kernel struct is read
// at an offset taken from BTF at start-up and passed in as OFF_<struct>__<member> (with
// probe_read, or as a plain load through bpf_get_current_task_btf(), which the verifier
// checks against BTF); the kernel headers BCC compiles against describe another kernel,
// so no header struct type is ever dereferenced here. User-space ABI structs (iovec,
// msghdr, sockaddr) are fixed.
//
// Compile-time knobs (set by probe.py): PAYLOAD_CAP (bytes kept), PROTO_CAP_CASES (the
// per-protocol caps, if any), PROTO_RECORDS_CASES (per-protocol record budgets, if any),
// PAYLOAD_MAX (the largest cap's power-of-two ceiling, for verifier bounds), MAX_IOV,
// MMSG_MAX_IOV, MAX_MMSG, CONN_MAX, GO_ENABLED, GO_PROCS_MAX, GO_MAX, GO_RING_PAGES, RINGBUF_PAGES, WAKEUP_BYTES, SELF_TGID, FILTER_PIDS, FILTER_COMMS,
// FILTER_EXCLUDE_COMMS, FILTER_PORTS, FILTER_NETNS, FILTER_CGROUPS, CGROUP_MAX_LEVEL, SKC_CHUNK, L7_ENABLED, L7_COUNT, L7_MAX_TRIES (and the l7_try_<i> programs),
// HAVE_EPOLL_PWAIT2, LOOP_COUNTER_ENABLED (the epoll-return counter), LOOP_SLOTS (its table), ASYNCIO_ENABLED (the asyncio task uprobes, attached by asyncio.py).

// struct pt_regs: the asyncio uprobes' context. Only argument registers are read
// (PT_REGS_PARM*), whose places are x86-64 ABI.
#include <uapi/linux/ptrace.h>

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define S_IFMT 0170000
#define S_IFSOCK 0140000
#define MSG_PEEK 2
#define EAGAIN 11
#define EINPROGRESS 115
// TCP states (include/net/tcp_states.h, stable ABI).
#define TCP_ESTABLISHED 1
#define TCP_TIME_WAIT 6
#define TCP_CLOSE 7
#define TCP_CLOSE_WAIT 8
#define TCP_LAST_ACK 9
#define TCP_CLOSING 11

// Syscall ids; decoder.py mirrors this table.
enum { SYS_READ = 1, SYS_READV, SYS_RECVFROM, SYS_RECVMSG, SYS_RECVMMSG,
       SYS_WRITE, SYS_WRITEV, SYS_SENDTO, SYS_SENDMSG, SYS_SENDMMSG,
       SYS_SOCKET, SYS_CONNECT, SYS_ACCEPT, SYS_ACCEPT4, SYS_CLOSE };
enum { DIR_NONE = 0, DIR_INGRESS = 1, DIR_EGRESS = 2 };
enum { L4_TCP = 1, L4_UDP = 2 };
enum { ROLE_UNKNOWN = 0, ROLE_CLIENT = 1, ROLE_SERVER = 2 };
#define L7_REQUEST 1
#define L7_RESPONSE 2
#define PROTO_NONE 255   // looked at L7_MAX_TRIES calls: none of the enabled protocols
// Record flags.
#define F_SEQ 1          // tcp_seq_start is valid
#define F_PEEK 2         // MSG_PEEK: bytes were not consumed from the stream
#define F_TRUNC 4        // payload cut at PAYLOAD_MAX
#define F_IOV_TRUNC 8    // more iovecs than MAX_IOV: payload misses their bytes

// Loss/failure counters, by cause; decoder.py mirrors the names.
enum { ST_EVENTS = 0, ST_RB_FULL, ST_INFLIGHT_FAIL, ST_CONN_FULL, ST_READ_FAIL,
       ST_MMSG_TRUNC, ST_IOV_TRUNC, ST_TAILCALL_FAIL, ST_TASK_EDGES, ST_TASK_DEPTH,
       ST_LOOP_SLOT_TAKEN, ST_NSTATS };
BPF_PERCPU_ARRAY(stats, u64, ST_NSTATS);

static __always_inline void stat_inc(u32 idx) {
    u64 *v = stats.lookup(&idx);
    if (v) *v += 1;
}

// The event loop's iteration of each thread: its epoll_wait/epoll_pwait/epoll_pwait2
// returns (loop_tick, at the end). Kept in a table indexed by the thread id's low bits, not
// in the thread's storage: an epoll return, which every Go netpoll and event loop on the
// host makes, then costs an array slot instead of a storage helper call (~24 ns less each,
// bench.bpfcost). A slot holds two threads, tagged with their ids; a third whose low bits
// match takes the older one's way (loop_slots_taken counts it: that thread, if alive,
// counts again from 0).
#if LOOP_COUNTER_ENABLED
struct loop_slot_t { u32 tid[2]; u64 n[2]; };
BPF_ARRAY(loop_slots, struct loop_slot_t, LOOP_SLOTS);

static __always_inline u64 loop_now(u32 tid) {
    u32 idx = tid & (LOOP_SLOTS - 1);
    struct loop_slot_t *s = loop_slots.lookup(&idx);
    if (!s)
        return 0;
    return s->tid[0] == tid ? s->n[0] : s->tid[1] == tid ? s->n[1] : 0;
}
#else
#define loop_now(tid) 0
#endif

struct event_t {
    u64 ts_enter;
    u64 ts_exit;
    u64 conn_id;
    u64 loop_iter;    // epoll_wait/epoll_pwait/epoll_pwait2 returns on this thread so far
    u64 atask;        // asyncio: the Task (TaskObj *) whose step made the call, else 0
    s64 ret;          // syscall return value (for mmsg: this message's msg_len)
    u32 pid;
    u32 tid;
    s32 fd;
    u32 seq;          // tcp sequence number of the first byte this call covered
    u32 payload_len;
    u16 msg_index;    // index within recvmmsg/sendmmsg, else 0
    u16 syscall;
    u16 family;
    u16 lport;
    u16 rport;
    u8 direction;
    u8 l4;
    u8 flags;
    u8 l7_proto;      // index+1 of the detected protocol in L7 order, 0 unknown
    u8 l7_role;       // ROLE_CLIENT / ROLE_SERVER of this process on the connection
    u8 tcp_state;     // sk_state after the call
    u8 pad[4];
    u8 laddr[16];
    u8 raddr[16];
    char comm[16];
    u64 goid;         // Go: the goroutine the call is made for (goroutine.py), else 0
    u8 payload[PAYLOAD_MAX * 2];  // twice the cap so the verifier can bound off + len
};
#define EVENT_HDR (sizeof(struct event_t) - PAYLOAD_MAX * 2)

BPF_PERCPU_ARRAY(scratch, struct event_t, 1);
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);

// Arguments saved at sys_enter in the calling thread's own storage, consumed at sys_exit.
// Task storage, not a hash keyed by pid_tgid: no hashing, locking or element allocation
// per call (it measured ~40% of the enter program), no table to fill, and the kernel frees
// a thread's slot when the thread exits.
struct inflight_t {
    u64 ts;
    u64 ptr;     // buf, iovec array, msghdr, mmsghdr array, or sockaddr (connect)
    u64 addr;    // sockaddr of sendto/recvfrom
    s32 fd;
    u32 cnt;     // iovcnt / vlen
    u32 flags;   // recv/send flags
    u16 sys;     // our SYS_* id; 0: nothing saved (taken, or never set)
    u16 nr;      // the kernel's syscall number: its exit must carry the same
    u32 go_off;  // Go: g.goid's offset in this process (go_procs), 0 not Go; with the verdict
    u32 go_cache;  // Go: 1 if the process's runtime.newproc1 is probed (goids may be cached)
    u64 g;       // Go: R14 (the goroutine's g) when args_at_exit had the registers, else 0
    u64 atask;   // the thread's asyncio task now (copied with the arguments at exit)
    u32 gen;     // the cached filter verdict below: filter generation it was reached at,
    u32 verdict; // the verdict,
    u64 comm[2]; // and the thread's name then
#if FILTER_CGROUPS
    u64 cgid;    // and its cgroup then (a thread moved into a container's cgroup re-decides)
#endif
#if FILTER_NETNS
    u64 nsproxy; // and its namespaces then (setns, or `ip netns exec` after netlink calls)
#endif
#if ASYNCIO_ENABLED
    u64 atask_saved[4];  // the tasks whose steps this one's interrupted (eager tasks nest)
    u32 atask_depth;
#endif
#if GO_ENABLED
    // The goroutines last seen on this thread (R14's g -> its goid, and the connection
    // whose writeLoop/readLoop it is, 0: none), valid while go_gen is gc_gen: reading
    // g.goid from user memory is most of a Go record's extra cost (~60 ns of ~90).
    u64 gc_g[4];
    u64 gc_goid[4];
    u64 gc_pconn[4];
    u32 gc_gen;
    u32 gc_next;   // the way filled next
#endif
};
BPF_TASK_STORAGE(inflight, struct inflight_t);
#ifndef BPF_LOCAL_STORAGE_GET_F_CREATE
#define BPF_LOCAL_STORAGE_GET_F_CREATE 1
#endif

// Per-connection state, keyed by (tgid, fd). It caches the fd's sock: a call whose fd
// still holds the same struct file skips the file -> inode -> socket -> sock walk (four
// reads of five). close() and dup2/dup3 onto the fd drop the entry, in any process; a
// file replaced unseen (exec, io_uring) no longer matches and gets a new entry.
struct conn_key_t { u32 tgid; s32 fd; };
struct conn_val_t {
    u64 sk; u64 file; u64 id; u8 proto; u8 role; u8 tries;
    // An established TCP socket's addresses never change: kept here after its first
    // record, they spare every later call the sock reads (two probe_reads, ~90 bytes).
    u8 l4;            // 0: nothing kept (UDP, or not yet established)
    u16 family; u16 lport; u16 rport;
    u8 laddr[16]; u8 raddr[16];
};
BPF_HASH(conns, struct conn_key_t, struct conn_val_t, CONN_MAX);
BPF_ARRAY(conn_counter, u64, 1);

#if FILTER_PIDS
BPF_HASH(pid_filter, u32, u8, 4096);
#endif
struct comm_key_t { char c[16]; };
#if FILTER_COMMS
BPF_HASH(comm_filter, struct comm_key_t, u8, 256);
#endif
#if FILTER_EXCLUDE_COMMS
BPF_HASH(exclude_comm_filter, struct comm_key_t, u8, 256);
#endif
#if FILTER_PORTS
BPF_HASH(port_filter, u16, u8, 1024);
#endif
// Confinement (probes.trace.netns / cgroups): only threads in one of these network
// namespaces (by inode number) / under one of these cgroup v2 directories (by id).
#if FILTER_NETNS
BPF_HASH(netns_filter, u32, u8, 64);
#endif
#if FILTER_CGROUPS
BPF_HASH(cgroup_filter, u64, u8, 256);
#endif

// Set by user space once filters and the L7 tail call are in place: BCC attaches the
// tracepoints while it loads, before any of that could be done. Its value is also the
// filters' generation: user space bumps it whenever it changes the pid filter.
BPF_ARRAY(armed, u32, 1);

// The filter's verdict: tgid and the filter tables decide it, and with a comm filter the
// thread's name (`name`: task->comm, read in place through the task's BTF pointer).
static __always_inline int confined(void) {
#if FILTER_NETNS
    // task->nsproxy->net_ns->ns.inum: nsproxy is NULL once the task is exiting.
    u64 t = bpf_get_current_task(), nsproxy = 0, net = 0;
    u32 inum = 0;
    bpf_probe_read_kernel(&nsproxy, sizeof(nsproxy), (void *)(t + OFF_task_struct__nsproxy));
    if (!nsproxy)
        return 0;
    bpf_probe_read_kernel(&net, sizeof(net), (void *)(nsproxy + OFF_nsproxy__net_ns));
    if (!net)
        return 0;
    bpf_probe_read_kernel(&inum, sizeof(inum), (void *)(net + OFF_net__ns + OFF_ns_common__inum));
    if (!netns_filter.lookup(&inum))
        return 0;
#endif
#if FILTER_CGROUPS
    // The thread's cgroup or any ancestor of it is listed: a container's processes sit in
    // child cgroups of the one named.
    int in = 0;
#pragma unroll
    for (int level = 1; level <= CGROUP_MAX_LEVEL; level++) {
        u64 id = bpf_get_current_ancestor_cgroup_id(level);
        if (!id)
            break;
        if (cgroup_filter.lookup(&id)) {
            in = 1;
            break;
        }
    }
    if (!in)
        return 0;
#endif
    return 1;
}

static __always_inline int filter_verdict(u32 tgid, u64 *name) {
    if (tgid == SELF_TGID || !confined())
        return 0;
#if FILTER_COMMS || FILTER_EXCLUDE_COMMS
    struct comm_key_t k;
    ((u64 *)k.c)[0] = name[0];
    ((u64 *)k.c)[1] = name[1];
#endif
#if FILTER_EXCLUDE_COMMS
    if (exclude_comm_filter.lookup(&k))
        return 0;
#endif
#if FILTER_PIDS
    if (pid_filter.lookup(&tgid))
        return 1;
#endif
#if FILTER_COMMS
    if (comm_filter.lookup(&k))
        return 1;
#endif
    return !(FILTER_PIDS || FILTER_COMMS);
}

#if GO_ENABLED
// Processes user space found to run Go (goroutine.py), with where their binary's runtime.g
// keeps goid (DWARF). Looked up with the filter verdict and cached beside it, so a call of
// a process that is not Go costs nothing more (user space bumps `armed` on a new entry).
struct go_proc_t { u32 goid_off; u32 cache; };  // cache: runtime.newproc1 is probed
BPF_HASH(go_procs, u32, struct go_proc_t, GO_PROCS_MAX);
#endif

// The calling thread's storage if recording is armed and the filter selects the thread.
// The storage caches the verdict with the filter generation and the name it was reached
// with, so a call costs two loads and a compare instead of hashing the name into one or
// two tables (~90 ns of the enter program's ~270).
static __always_inline struct inflight_t *selected_thread(void) {
    u32 zero = 0;
    u32 *gen = armed.lookup(&zero);
    if (!gen || !*gen)
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u64 *name = (u64 *)((char *)bpf_get_current_task_btf() + OFF_task_struct__comm);
    // Every thread that makes a traced syscall gets a slot (~64 bytes, freed with the
    // thread), selected or not: the cached verdict lives there.
    struct inflight_t *a = inflight.task_storage_get(bpf_get_current_task_btf(), 0,
                                                     BPF_LOCAL_STORAGE_GET_F_CREATE);
    if (!a) {
        if (filter_verdict(tgid, name))  // a loss only where the call was to be recorded
            stat_inc(ST_INFLIGHT_FAIL);
        return 0;
    }
#if FILTER_CGROUPS
    u64 cgid = bpf_get_current_cgroup_id();
    if (a->cgid != cgid) {
        a->cgid = cgid;
        a->gen = 0;   // decide again below
    }
#endif
#if FILTER_NETNS
    u64 nsproxy = 0;
    bpf_probe_read_kernel(&nsproxy, sizeof(nsproxy),
                          (char *)bpf_get_current_task() + OFF_task_struct__nsproxy);
    if (a->nsproxy != nsproxy) {
        a->nsproxy = nsproxy;
        a->gen = 0;
    }
#endif
#if FILTER_COMMS || FILTER_EXCLUDE_COMMS
    u64 c0 = name[0], c1 = name[1];
    if (a->gen != *gen || a->comm[0] != c0 || a->comm[1] != c1) {
        a->comm[0] = c0;
        a->comm[1] = c1;
#else
    if (a->gen != *gen) {
#endif
        a->gen = *gen;
        a->verdict = filter_verdict(tgid, name);
#if GO_ENABLED
        struct go_proc_t *gp = go_procs.lookup(&tgid);
        a->go_off = gp ? gp->goid_off : 0;
        a->go_cache = gp ? gp->cache : 0;
        a->gc_g[0] = a->gc_g[1] = a->gc_g[2] = a->gc_g[3] = 0;  // e.g. another program (exec)
#endif
    }
    return a->verdict ? a : 0;
}

static __always_inline void store_args(struct inflight_t *a, u64 ts, u16 nr, u16 sys, s32 fd,
                                       u64 ptr, u64 addr, u32 cnt, u32 flags) {
    a->ts = ts;
    a->sys = sys;
    a->nr = nr;
    a->fd = fd;
    a->ptr = ptr;
    a->addr = addr;
    a->cnt = cnt;
    a->flags = flags;
    a->g = 0;
}

static __always_inline int save_args(u16 nr, u16 sys, s32 fd, u64 ptr, u64 addr, u32 cnt, u32 flags) {
    struct inflight_t *a = fd < 0 ? 0 : selected_thread();
    if (a)
        store_args(a, bpf_ktime_get_ns(), nr, sys, fd, ptr, addr, cnt, flags);
    return 0;
}

// Ingress calls (read, readv, recvfrom, recvmsg, recvmmsg) have no enter program: their
// bytes count from the exit (a read may block before they arrive), so the enter time is
// not needed, and the arguments are still in the registers the syscall was entered with
// (task_pt_regs: the kernel writes only ax, the return value). That spares every such
// call, traced or not, a tracepoint hit and a program run. 1 if the call is selected;
// its arguments are then saved as save_args would have, with no enter time (ts 0).
static __always_inline int args_at_exit(u16 nr, u16 sys) {
    struct inflight_t *a = selected_thread();
    if (!a)
        return 0;
    char *regs = (char *)bpf_task_pt_regs(bpf_get_current_task_btf());
    if (!regs)
        return 0;
    // x86-64 syscall arguments: di, si, dx, r10, r8, r9.
    s32 fd = (s32)*(u64 *)(regs + OFF_pt_regs__di);
    u64 si = *(u64 *)(regs + OFF_pt_regs__si);
    u64 dx = *(u64 *)(regs + OFF_pt_regs__dx);
    if (fd < 0)
        return 0;
    if (sys == SYS_READ)
        store_args(a, 0, nr, sys, fd, si, 0, 0, 0);
    else if (sys == SYS_READV)
        store_args(a, 0, nr, sys, fd, si, 0, dx, 0);
    else if (sys == SYS_RECVMSG)
        store_args(a, 0, nr, sys, fd, si, 0, 0, dx);
    else {  // recvfrom(fd, buf, len, flags, addr, addrlen), recvmmsg(fd, vec, vlen, flags, timeout)
        u64 r10 = *(u64 *)(regs + OFF_pt_regs__r10);
        if (sys == SYS_RECVFROM)
            store_args(a, 0, nr, sys, fd, si, *(u64 *)(regs + OFF_pt_regs__r8), 0, r10);
        else
            store_args(a, 0, nr, sys, fd, si, 0, dx, r10);
    }
#if GO_ENABLED
    if (a->go_off)  // the registers are at hand here: go_fill needs no helper call for them
        a->g = *(u64 *)(regs + OFF_pt_regs__r14);
#endif
    return 1;
}

#define RD(dst, src) bpf_probe_read_kernel(&(dst), sizeof(dst), (void *)(src))

// fd -> struct file *, walking task->files->fdt->fd[fd] at BTF offsets.
// Returns 1 and sets *out for an open fd, 0 when there is none, -1 on a read failure.
static __always_inline int fd_to_file(s32 fd, u64 *out) {
    // Plain loads through the task's BTF pointer (the verifier turns them into guarded
    // loads, a few ns each) instead of a probe_read helper call per pointer.
    char *task = (char *)bpf_get_current_task_btf();
    char *files = *(char **)(task + OFF_task_struct__files);
    if (!files)
        return -1;
    char *fdt = *(char **)(files + OFF_files_struct__fdt);
    if (!fdt)
        return -1;
    u32 max_fds = *(u32 *)(fdt + OFF_fdtable__max_fds);
    if ((u32)fd >= max_fds)
        return 0;
    u64 fdarr = *(u64 *)(fdt + OFF_fdtable__fd), file = 0;
    if (!fdarr || RD(file, fdarr + (u64)fd * 8))
        return -1;
    if (!file)
        return 0;
    *out = file;
    return 1;
}

// struct file * -> struct sock *: 1 for a socket, 0 for another kind of file, -1 on a
// read failure.
static __always_inline int file_to_sk(u64 file, u64 *out) {
    u64 inode = 0, sock = 0, sk = 0;
    u16 mode = 0;
    if (RD(inode, file + OFF_file__f_inode) || RD(mode, inode + OFF_inode__i_mode))
        return -1;
    if ((mode & S_IFMT) != S_IFSOCK)
        return 0;
    if (RD(sock, file + OFF_file__private_data) || RD(sk, sock + OFF_socket__sk) || !sk)
        return -1;
    *out = sk;
    return 1;
}

// Fill family, l4, addresses and ports from the sock; 0 if it is an IPv4/6 TCP/UDP socket.
static __always_inline int read_sock(u64 sk, struct event_t *e) {
    u8 c[SKC_CHUNK];  // one read covers every sock_common member we need
    u16 proto = 0;
    u64 skc = sk + OFF_sock____sk_common;
    if (bpf_probe_read_kernel(c, sizeof(c), (void *)skc) ||
        RD(proto, sk + OFF_sock__sk_protocol)) {
        stat_inc(ST_READ_FAIL);
        return -1;
    }
    u16 family = *(u16 *)(c + OFF_sock_common__skc_family);
    if (family != AF_INET && family != AF_INET6)
        return -1;
    if (proto == IPPROTO_TCP)
        e->l4 = L4_TCP;
    else if (proto == IPPROTO_UDP)
        e->l4 = L4_UDP;
    else
        return -1;
    e->family = family;
    e->tcp_state = *(u8 *)(c + OFF_sock_common__skc_state);  // TCP_* (0 is none of them)
    e->lport = *(u16 *)(c + OFF_sock_common__skc_num);
    e->rport = bpf_ntohs(*(u16 *)(c + OFF_sock_common__skc_dport));
    if (family == AF_INET) {
        __builtin_memcpy(e->laddr, c + OFF_sock_common__skc_rcv_saddr, 4);
        __builtin_memcpy(e->raddr, c + OFF_sock_common__skc_daddr, 4);
    } else {
        __builtin_memcpy(e->laddr, c + OFF_sock_common__skc_v6_rcv_saddr, 16);
        __builtin_memcpy(e->raddr, c + OFF_sock_common__skc_v6_daddr, 16);
    }
    return 0;
}

// Remote address from a user sockaddr (unconnected UDP: sendto/recvfrom/msg_name).
static __always_inline void addr_from_user(u64 uaddr, struct event_t *e) {
    if (!uaddr)
        return;
    u8 sa[24] = {};
    if (bpf_probe_read_user(sa, sizeof(sa), (void *)uaddr))
        return;
    u16 fam = *(u16 *)sa;
    if (fam != e->family && !(fam == AF_INET && e->family == AF_INET6))
        return;
    e->rport = bpf_ntohs(*(u16 *)(sa + 2));
    __builtin_memset(e->raddr, 0, 16);
    if (fam == AF_INET && e->family == AF_INET) {
        __builtin_memcpy(e->raddr, sa + 4, 4);
    } else if (fam == AF_INET) {  // v4 peer on a dual-stack socket: v4-mapped form
        e->raddr[10] = 0xff;
        e->raddr[11] = 0xff;
        __builtin_memcpy(e->raddr + 12, sa + 4, 4);
    } else {
        __builtin_memcpy(e->raddr, sa + 8, 16);
    }
}

// A new connection entry for (tgid, fd); NULL only when the map is full.
static __always_inline struct conn_val_t *conn_new(u32 tgid, s32 fd, u64 sk, u64 file) {
    struct conn_key_t k = {.tgid = tgid, .fd = fd};
    u32 zero = 0;
    u64 *ctr = conn_counter.lookup(&zero);
    if (!ctr)
        return 0;
    struct conn_val_t nv = {.sk = sk, .file = file, .id = __sync_fetch_and_add(ctr, 1) + 1};
    if (conns.update(&k, &nv)) {
        stat_inc(ST_CONN_FULL);
        return 0;
    }
    return conns.lookup(&k);
}

#if L7_ENABLED
// One tail-called program per enabled protocol (generated by probe.py after this file,
// slot i holds protocol i+1), chained: each is verified alone, so the verifier's work
// grows with the number of protocols instead of multiplying across them.
BPF_PROG_ARRAY(l7_progs, L7_COUNT);

#ifdef PROTO_RECORDS_CASES
// The most records sent for a connection of protocol `proto` (0: no limit): for those
// whose first messages say all there is to learn (tls: the hellos, then ciphertext).
static __always_inline u32 proto_records(u8 proto) {
    switch (proto) {
    PROTO_RECORDS_CASES
    }
    return 0;
}
#endif

// 1 if the record should be sent: its connection speaks an enabled protocol (and, for a
// protocol with a record budget, has some left: `tries` counts its records once detected).
static __always_inline int l7_pass(struct event_t *e, struct conn_val_t *c) {
    if (!c)
        return 0;
    e->l7_proto = c->proto;
    e->l7_role = c->role;
    if (c->proto == 0 || c->proto == PROTO_NONE)
        return 0;
#ifdef PROTO_RECORDS_CASES
    u32 budget = proto_records(c->proto);
    if (budget && ++c->tries > budget) {
        c->proto = PROTO_NONE;   // the rest of the connection costs a lookup
        return 0;
    }
#endif
    return 1;
}
#endif

// The bytes of payload kept for a call on this connection: its protocol's own cap once
// detected (probes.trace.protocol_payload_bytes), else payload_bytes. Never > PAYLOAD_MAX.
static __always_inline u32 payload_cap(struct conn_val_t *conn) {
#ifdef PROTO_CAP_CASES
    if (conn) {
        switch (conn->proto) {
        PROTO_CAP_CASES
        }
    }
#endif
    return PAYLOAD_CAP;
}

// Copy up to `len` user bytes into the payload at `off`, never past `cap` (<= PAYLOAD_MAX).
static __always_inline u32 copy_user(struct event_t *e, u32 start, u64 src, u64 len, u32 cap) {
    u64 off = start;
    if (off >= cap || !src)
        return 0;
    u64 n = cap - off;
    if (len < n)
        n = len;
    // The verifier must see off < MAX and 0 < n <= MAX (payload holds 2 * MAX); hide the
    // values from clang so it cannot fold these checks into forms the verifier can't follow.
    asm volatile("" : "+r"(off), "+r"(n));
    off &= PAYLOAD_MAX - 1;
    if (n == 0 || n > PAYLOAD_MAX)
        return 0;
    // Clang folds that check into one compare of n - (MAX + 1), whose bounds 6.1's verifier
    // does not carry back to n itself (6.18's does). A mask bounds the register passed on
    // every verifier: n - 1 is in [0, MAX - 1] here, so this leaves n unchanged.
    asm volatile("" : "+r"(n));
    n = ((n - 1) & (PAYLOAD_MAX - 1)) + 1;
    if (bpf_probe_read_user(e->payload + off, n, (void *)src)) {
        stat_inc(ST_READ_FAIL);
        return 0;
    }
    return n;
}

// Gather the first `total` bytes of an iovec array. The running offset and remainder live
// in a map, not in registers: the verifier then sees the same (unknown, masked) state at
// every loop head and prunes, instead of multiplying paths once per iovec.
struct gather_t { u64 left; u64 off; };
BPF_PERCPU_ARRAY(gather, struct gather_t, 1);

static __always_inline u32 copy_iov(struct event_t *e, u64 iov, u64 iovcnt, u64 total,
                                    u32 cap, const int max_iov) {
    u32 zero = 0;
    struct gather_t *g = gather.lookup(&zero);
    if (!g)
        return 0;
    g->left = total;
    g->off = 0;
    for (int i = 0; i < max_iov; i++) {
        if (i >= iovcnt || g->left == 0 || g->off >= cap)
            break;
        u64 v[2] = {};  // struct iovec { void *base; size_t len; }
        if (bpf_probe_read_user(v, sizeof(v), (void *)(iov + (u64)i * 16))) {
            stat_inc(ST_READ_FAIL);
            break;
        }
        u64 n = v[1] < g->left ? v[1] : g->left;
        g->off += copy_user(e, g->off, v[0], n, cap);
        g->left -= n;
    }
    u32 off = g->off;
    if (iovcnt > max_iov && g->left > 0 && off < cap) {
        e->flags |= F_IOV_TRUNC;
        stat_inc(ST_IOV_TRUNC);
    }
    return off;
}

// Bytes written on this CPU since the last forced wake-up.
BPF_PERCPU_ARRAY(since_wakeup, u32, 1);

static __always_inline void submit(struct event_t *e) {
#if FILTER_PORTS
    // Checked last: an unconnected UDP socket's peer is known only from the call's address.
    u16 lp = e->lport, rp = e->rport;
    if (!port_filter.lookup(&lp) && !port_filter.lookup(&rp))
        return;
#endif
    u32 len = e->payload_len & (PAYLOAD_MAX * 2 - 1);
    u64 flags = BPF_RB_NO_WAKEUP;
    // Batch wake-ups: user space drains on a timer and is woken early only once this CPU
    // wrote WAKEUP_BYTES (a fraction of the ring) since its last wake-up. A wake-up costs
    // the writer ~20 us on a VM (irq_work, IPI, scheduler): once per 64 records it was a
    // quarter of the traced call's cost. (BCC 0.26 lacks ringbuf_query: bytes per CPU.)
    u32 zero = 0;
    u32 *n = since_wakeup.lookup(&zero);
    if (n) {
        *n += EVENT_HDR + len;
        if (*n >= WAKEUP_BYTES) {
            *n = 0;
            flags = BPF_RB_FORCE_WAKEUP;
        }
    }
    if (events.ringbuf_output(e, EVENT_HDR + len, flags))
        stat_inc(ST_RB_FULL);
    else
        stat_inc(ST_EVENTS);
}

#if GO_ENABLED
#include <uapi/linux/ptrace.h>  // the uprobes' registers (x86-64 user ABI, fixed)
// -- Go: the goroutine a call is made for ----------------------------------------------------
// A Go program's goroutines migrate between OS threads, so the thread says nothing of which
// request a call serves; the goroutine does. Go >= 1.17 on x86-64 keeps the current g in
// R14 (user registers, saved at the syscall), and g->goid sits at an offset goroutine.py
// reads from the binary's DWARF (runtime.g.goid) and stores per process in go_procs, so a
// process that is not Go pays one lookup per record. http.Client writes a request from the
// connection's writeLoop goroutine and reads the answer in its readLoop: uprobes on
// (*persistConn).writeLoop/readLoop (loop goroutine -> pconn) and roundTrip (pconn -> the
// goroutine calling it, until its `ret`s) give those calls to the caller instead.
// runtime.newproc1 gives spawn edges (child -> parent goid) to user space (go_events).
struct go_key_t { u32 tgid; u32 pad; u64 id; };
BPF_TABLE("lru_hash", struct go_key_t, u64, go_loop_pconn, GO_MAX);    // loop goid -> pconn
BPF_TABLE("lru_hash", struct go_key_t, u64, go_pconn_caller, GO_MAX);  // pconn -> caller goid
BPF_TABLE("lru_hash", struct go_key_t, u64, go_in_roundtrip, GO_MAX);  // caller goid -> pconn
BPF_TABLE("lru_hash", u64, u64, go_spawning, 4096);    // thread in newproc1 -> parent goid
struct go_event_t { u32 kind; u32 tgid; u64 goid; u64 parent; u64 ts; };
enum { GO_EV_EXEC = 1, GO_EV_SPAWN = 2 };
BPF_RINGBUF_OUTPUT(go_events, GO_RING_PAGES);
// Bumped whenever a goroutine id may change under a g pointer, i.e. at each entry of
// runtime.newproc1 (the only place that gives a g, maybe a dead one reused, its goid) and
// at a connection loop's start: every thread's goroutine cache (gc_*) is then stale. A g
// being reused is dead, so no thread can cache its old goid again after the bump.
BPF_ARRAY(go_gen, u32, 1);

static __always_inline void go_gen_bump(void) {
    u32 zero = 0, *gen = go_gen.lookup(&zero);
    if (gen)
        __sync_fetch_and_add(gen, 1);
}
// goroutine.py's GO_STAT_NAMES mirrors this enum.
enum { GS_GOID_FAIL = 0, GS_HANDOFF, GS_LOOP_IDLE, GS_SPAWN, GS_EVENTS_FULL,
       GS_ROUNDTRIP, GS_NSTATS };
BPF_PERCPU_ARRAY(go_stats, u64, GS_NSTATS);

static __always_inline void go_stat(u32 idx) {
    u64 *v = go_stats.lookup(&idx);
    if (v) *v += 1;
}

static __always_inline u64 go_goid_of(u64 g, u32 off) {
    u64 goid = 0;
    if (!g || bpf_probe_read_user(&goid, sizeof(goid), (void *)(g + off)) || !goid) {
        go_stat(GS_GOID_FAIL);
        return 0;
    }
    return goid;
}

// The record's goroutine: R14's, or, for a writeLoop/readLoop goroutine of a connection in
// a roundTrip, the caller's. st: the thread's storage (go_off: its cached go_procs offset,
// 0: not Go; go_cache: whether its goroutine cache may be used); g: R14 if known, else 0.
static __always_inline void go_fill(struct event_t *e, u32 tgid, struct inflight_t *st, u64 g) {
    e->goid = 0;
    u32 go_off = st->go_off;
    if (!go_off)
        return;
    if (!g) {  // g: R14 as args_at_exit saved it, 0 if it did not run for this call
        char *regs = (char *)bpf_task_pt_regs(bpf_get_current_task_btf());
        if (!regs)
            return;
        g = *(u64 *)(regs + OFF_pt_regs__r14);
    }
    u64 goid = 0, pconn = 0;
    u32 zero = 0, *gen = st->go_cache ? go_gen.lookup(&zero) : 0;
    if (gen) {
        u32 now = *gen;
        if (st->gc_gen != now) {
            st->gc_gen = now;
            st->gc_g[0] = st->gc_g[1] = st->gc_g[2] = st->gc_g[3] = 0;
        } else if (g) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                if (st->gc_g[i] == g) {
                    goid = st->gc_goid[i];
                    pconn = st->gc_pconn[i];
                    break;
                }
            }
        }
    }
    if (!goid) {
        goid = go_goid_of(g, go_off);
        if (!goid)
            return;
        struct go_key_t k = {.tgid = tgid, .id = goid};
        u64 *p = go_loop_pconn.lookup(&k);
        pconn = p ? *p : 0;
        if (gen) {
            u32 w = st->gc_next & 3;
            st->gc_g[w] = g;
            st->gc_goid[w] = goid;
            st->gc_pconn[w] = pconn;
            st->gc_next = w + 1;
        }
    }
    if (pconn) {
        struct go_key_t ck = {.tgid = tgid, .id = pconn};
        u64 *caller = go_pconn_caller.lookup(&ck);
        if (caller) {
            goid = *caller;
            go_stat(GS_HANDOFF);
        } else {
            go_stat(GS_LOOP_IDLE);  // e.g. the read of a server's close: no call waits
        }
    }
    e->goid = goid;
}

// The goroutine running a uprobed Go function (R14 in Go code), 0 if unknown.
static __always_inline u64 go_current(struct pt_regs *ctx, u32 tgid, u32 *off) {
    struct go_proc_t *p = go_procs.lookup(&tgid);
    if (!p)
        return 0;
    *off = p->goid_off;
    return go_goid_of(ctx->r14, p->goid_off);
}

// (*persistConn).roundTrip entry: receiver (the connection) in RAX.
int go_roundtrip_enter(struct pt_regs *ctx) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32, off = 0;
    u64 goid = go_current(ctx, tgid, &off), pconn = ctx->ax;
    if (!goid || !pconn)
        return 0;
    struct go_key_t ck = {.tgid = tgid, .id = pconn}, gk = {.tgid = tgid, .id = goid};
    go_pconn_caller.update(&ck, &goid);
    go_in_roundtrip.update(&gk, &pconn);
    go_stat(GS_ROUNDTRIP);
    return 0;
}

// Each `ret` of roundTrip (never a uretprobe: Go moves goroutine stacks): the connection
// no longer works for this caller.
int go_roundtrip_return(struct pt_regs *ctx) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32, off = 0;
    u64 goid = go_current(ctx, tgid, &off);
    if (!goid)
        return 0;
    struct go_key_t gk = {.tgid = tgid, .id = goid};
    u64 *pconn = go_in_roundtrip.lookup(&gk);
    if (!pconn)
        return 0;
    struct go_key_t ck = {.tgid = tgid, .id = *pconn};
    go_in_roundtrip.delete(&gk);
    u64 *caller = go_pconn_caller.lookup(&ck);
    if (caller && *caller == goid)
        go_pconn_caller.delete(&ck);
    return 0;
}

// (*persistConn).writeLoop / readLoop entry: this goroutine does that connection's I/O.
int go_loop_enter(struct pt_regs *ctx) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32, off = 0;
    u64 goid = go_current(ctx, tgid, &off), pconn = ctx->ax;
    if (!goid || !pconn)
        return 0;
    struct go_key_t k = {.tgid = tgid, .id = goid};
    go_loop_pconn.update(&k, &pconn);
    go_gen_bump();  // a thread may have cached this goroutine as no loop's
    return 0;
}

// runtime.newproc1(fn, callergp, callerpc) runs on the system stack (R14 is g0): the
// parent is callergp (RBX); the child, returned in RAX, has its goid at the `ret`s.
int go_newproc1_enter(struct pt_regs *ctx) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct go_proc_t *p = go_procs.lookup(&tgid);
    if (!p)
        return 0;
    go_gen_bump();
    u64 parent = go_goid_of(ctx->bx, p->goid_off), id = bpf_get_current_pid_tgid();
    if (parent)
        go_spawning.update(&id, &parent);
    return 0;
}

int go_newproc1_return(struct pt_regs *ctx) {
    u64 id = bpf_get_current_pid_tgid();
    u64 *parent = go_spawning.lookup(&id);
    if (!parent)
        return 0;
    u64 pg = *parent;
    go_spawning.delete(&id);
    u32 tgid = id >> 32;
    struct go_proc_t *p = go_procs.lookup(&tgid);
    if (!p)
        return 0;
    u64 child = go_goid_of(ctx->ax, p->goid_off);
    if (!child)
        return 0;
    struct go_event_t ev = {.kind = GO_EV_SPAWN, .tgid = tgid, .goid = child, .parent = pg,
                            .ts = bpf_ktime_get_ns()};
    // No wake-up: the agent drains this ring at every poll of the records' ring.
    if (go_events.ringbuf_output(&ev, sizeof(ev), BPF_RB_NO_WAKEUP))
        go_stat(GS_EVENTS_FULL);
    else
        go_stat(GS_SPAWN);
    return 0;
}

// Every exec may start a Go program: the process's old entry goes (its binary is gone) and
// user space looks at the new one (goroutine.py).
TRACEPOINT_PROBE(sched, sched_process_exec) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (tgid == SELF_TGID)
        return 0;
    go_procs.delete(&tgid);
    // The exec'ing thread keeps its storage: its cached offset was the old program's.
    struct inflight_t *a = inflight.task_storage_get(bpf_get_current_task_btf(), 0, 0);
    if (a)
        a->gen = 0;
    struct go_event_t ev = {.kind = GO_EV_EXEC, .tgid = tgid, .ts = bpf_ktime_get_ns()};
    if (go_events.ringbuf_output(&ev, sizeof(ev), BPF_RB_NO_WAKEUP))
        go_stat(GS_EVENTS_FULL);
    return 0;
}
#endif

// Start a record for a socket fd: the record, *skp and *connp (NULL only when the
// connection map is full) when the fd is a TCP/UDP socket; 0 otherwise, and also (with
// L7 detection) for a connection already found to speak none of the enabled protocols:
// its calls cost a lookup, not a record.
static __always_inline struct event_t *begin(u64 pid_tgid, s32 fd, u16 sys, u64 ts_enter,
                                             struct inflight_t *st, u64 g,
                                             u64 *skp, struct conn_val_t **connp) {
    u64 file = 0, sk = 0;
    int found = fd_to_file(fd, &file);
    if (found <= 0) {
        if (found < 0)
            stat_inc(ST_READ_FAIL);
        return 0;
    }
    struct conn_key_t k = {.tgid = pid_tgid >> 32, .fd = fd};
    struct conn_val_t *conn = conns.lookup(&k);
    if (conn && conn->file == file) {
        sk = conn->sk;
#if L7_ENABLED
        if (conn->proto == PROTO_NONE)
            return 0;
#endif
    } else {
        conn = 0;
        found = file_to_sk(file, &sk);
        if (found <= 0) {
            if (found < 0)
                stat_inc(ST_READ_FAIL);
            return 0;
        }
    }
    u32 zero = 0;
    struct event_t *e = scratch.lookup(&zero);
    if (!e)
        return 0;
    e->flags = 0;
    e->l4 = 0;
    e->l7_proto = 0;
    e->l7_role = 0;
    if (conn && conn->l4) {
        e->l4 = conn->l4;
        e->family = conn->family;
        e->lport = conn->lport;
        e->rport = conn->rport;
        e->tcp_state = 0;  // not read: set_seq reads it only if it needs it
        __builtin_memcpy(e->laddr, conn->laddr, 16);
        __builtin_memcpy(e->raddr, conn->raddr, 16);
    } else {
        if (read_sock(sk, e))
            return 0;
        if (!conn)  // only TCP/UDP sockets get an entry
            conn = conn_new(pid_tgid >> 32, fd, sk, file);
        if (conn && e->l4 == L4_TCP && e->tcp_state == TCP_ESTABLISHED) {
            conn->family = e->family;
            conn->lport = e->lport;
            conn->rport = e->rport;
            __builtin_memcpy(conn->laddr, e->laddr, 16);
            __builtin_memcpy(conn->raddr, e->raddr, 16);
            conn->l4 = L4_TCP;
        }
    }
    e->ts_exit = bpf_ktime_get_ns();
    e->ts_enter = ts_enter ? ts_enter : e->ts_exit;  // 0: an ingress call (args_at_exit)
    e->pid = pid_tgid >> 32;
    e->tid = (u32)pid_tgid;
    e->fd = fd;
    e->syscall = sys;
    e->msg_index = 0;
    e->payload_len = 0;
    e->seq = 0;
    e->conn_id = conn ? conn->id : 0;
    // task->comm is NUL-padded (set with strscpy_pad): two loads give what the helper would.
    u64 *name = (u64 *)((char *)bpf_get_current_task_btf() + OFF_task_struct__comm);
    ((u64 *)e->comm)[0] = name[0];
    ((u64 *)e->comm)[1] = name[1];
#if GO_ENABLED
    go_fill(e, pid_tgid >> 32, st, g);
#else
    e->goid = 0;
#endif
    *skp = sk;
    *connp = conn;
    return e;
}

static __always_inline void set_seq(struct event_t *e, u64 sk, u8 dir, u32 peek, u64 consumed_after) {
    // The stream position after the call, minus what the call (and later mmsg messages)
    // moved it: the first byte this call covered. Both ends of a connection agree on it.
    if (e->l4 != L4_TCP)
        return;
    u32 seq = 0;
    if (dir == DIR_EGRESS) {
        if (RD(seq, sk + OFF_tcp_sock__write_seq))
            return;
    } else {
        u32 rcv_nxt = 0;
        if (RD(seq, sk + OFF_tcp_sock__copied_seq) || RD(rcv_nxt, sk + OFF_tcp_sock__rcv_nxt))
            return;
        // A read that reaches the peer's FIN moves copied_seq one past the data (the FIN
        // takes a sequence number). Once the FIN is in (the peer closed), copied_seq can
        // equal rcv_nxt only by having consumed it: take it back out.
        u8 st = e->tcp_state;
        if (seq == rcv_nxt && !st)  // addresses came from the conn cache: state not read
            RD(st, sk + OFF_sock____sk_common + OFF_sock_common__skc_state);
        if (seq == rcv_nxt && (st == TCP_CLOSE_WAIT || st == TCP_LAST_ACK || st == TCP_CLOSING ||
                               st == TCP_TIME_WAIT || st == TCP_CLOSE))
            seq -= 1;
    }
    if (peek) {
        e->flags |= F_PEEK;
        e->seq = seq;
    } else {
        e->seq = seq - (u32)consumed_after;
    }
    e->flags |= F_SEQ;
}

// Every sys_exit_* tracepoint has this layout; the shared exit programs below serve many
// syscalls, so they read it directly rather than through a per-syscall args struct.
struct exit_ctx { u64 common; s32 nr; u32 pad; s64 ret; };

// The arguments saved at sys_enter by this thread, consumed: 1 if they belong to this exit
// (same syscall number; an enter we missed leaves no entry, a stale one never matches).
static __always_inline struct inflight_t *take_args(struct exit_ctx *ctx,
                                                    struct inflight_t *out) {
    struct inflight_t *a = inflight.task_storage_get(bpf_get_current_task_btf(), 0, 0);
    if (!a || !a->sys)
        return 0;
    __builtin_memcpy(out, a, offsetof(struct inflight_t, gen));  // the call's arguments
    a->sys = 0;
    return out->nr == (u16)ctx->nr ? a : 0;
}

// The syscall programs hold no logic of their own: they tail-call one of the shared
// programs, so clang compiles and the verifier checks each body once instead of once per
// syscall (start-up time), and a call costs one jump.
BPF_PROG_ARRAY(exit_progs, 4);
enum { EXIT_DATA = 0, EXIT_MMSG, EXIT_CTL, EXIT_MMSG_MSG };

// An ingress call's exit program: its arguments (args_at_exit), then the shared program.
// EAGAIN (an event loop draining a socket: one per request in many servers) ends here,
// before the thread's storage is looked up.
static __always_inline int exit_args_then(void *ctx, u16 sys, int prog) {
    struct exit_ctx *x = ctx;
    if (x->ret != -EAGAIN && args_at_exit((u16)x->nr, sys))
        exit_progs.call(ctx, prog);
    return 0;
}

// What mmsg_msg needs of mmsg_exit's call, per CPU (a tail call stays on its CPU).
struct mmsg_state_t {
    u64 ptr;       // the mmsghdr array
    u64 sk;
    u64 conn_id;
    u64 total;     // bytes of all messages
    u64 done;      // bytes of the messages before this one
    s64 ret;       // messages transferred
    u32 i;         // this message
    u16 cap;       // payload bytes kept per message (payload_cap)
    u16 rport;
    u8 dir;
    u8 peek;
    u8 l7_proto;
    u8 l7_role;
    u8 pad[4];
    u8 raddr[16];
};
BPF_PERCPU_ARRAY(mmsg_state, struct mmsg_state_t, 1);

// Exit of read/write/readv/writev/recvfrom/sendto/recvmsg/sendmsg.
int data_exit(struct exit_ctx *ctx) {
    u64 id = bpf_get_current_pid_tgid();
    struct inflight_t args, *store = take_args(ctx, &args);
    if (!store)
        return 0;
    s64 ret = ctx->ret;
    u16 sys = args.sys;
    u8 dir = sys <= SYS_RECVMMSG ? DIR_INGRESS : DIR_EGRESS;
    if (ret == -EAGAIN)
        return 0;
    u64 sk = 0;
    struct conn_val_t *conn = 0;
    struct event_t *e = begin(id, args.fd, sys, args.ts, store, args.g, &sk, &conn);
    if (!e)
        return 0;
    e->loop_iter = loop_now((u32)id);
    e->atask = args.atask;
    e->direction = dir;
    e->ret = ret;
    u64 name = args.addr;
    if (ret > 0) {
        u32 cap = payload_cap(conn);
        if (sys == SYS_READ || sys == SYS_WRITE || sys == SYS_RECVFROM || sys == SYS_SENDTO) {
            e->payload_len = copy_user(e, 0, args.ptr, ret, cap);
        } else {
            // One gather loop for readv/writev and recvmsg/sendmsg: the verifier walks
            // every iteration of each copy it sees, so two copies cost it twice.
            u64 iov = args.ptr, iovcnt = args.cnt;
            if (sys != SYS_READV && sys != SYS_WRITEV) {  // struct user_msghdr
                u64 m[4] = {};  // msg_name, msg_namelen(+pad), msg_iov, msg_iovlen
                if (bpf_probe_read_user(m, sizeof(m), (void *)args.ptr))
                    m[3] = 0;
                name = m[0];
                iov = m[2];
                iovcnt = m[3];
            }
            e->payload_len = copy_iov(e, iov, iovcnt, ret, cap, MAX_IOV);
        }
        if (ret > cap)
            e->flags |= F_TRUNC;
        set_seq(e, sk, dir, (args.flags & MSG_PEEK) && dir == DIR_INGRESS, ret);
    }
    if (e->l4 == L4_UDP && name)
        addr_from_user(name, e);
#if L7_ENABLED
    if (conn && conn->proto == 0 && e->payload_len > 0) {
        // Detection runs in tail-called programs, one per protocol (l7_step), not inlined
        // here (that made start-up ten times slower). They submit the record.
        l7_progs.call(ctx, 0);
        stat_inc(ST_TAILCALL_FAIL);  // cannot happen once armed; if it does, user space detects
    } else if (!l7_pass(e, conn)) {
        return 0;
    }
#endif
    submit(e);
    return 0;
}

// Exit of recvmmsg/sendmmsg: one record per transferred message.
int mmsg_exit(struct exit_ctx *ctx) {
    u64 id = bpf_get_current_pid_tgid();
    struct inflight_t args, *store = take_args(ctx, &args);
    if (!store)
        return 0;
    s64 ret = ctx->ret;
    u16 sys = args.sys;
    u8 dir = sys == SYS_RECVMMSG ? DIR_INGRESS : DIR_EGRESS;
    if (ret <= 0)
        return 0;
    u64 sk = 0;
    struct conn_val_t *conn = 0;
    struct event_t *e = begin(id, args.fd, sys, args.ts, store, args.g, &sk, &conn);
    if (!e)
        return 0;
    e->loop_iter = loop_now((u32)id);
    e->atask = args.atask;
#if L7_ENABLED
    // Decided once for all messages (a branch inside the loop multiplies the paths the
    // verifier walks). The detectors cost the verifier more than it allows inside the
    // per-message loop: undetected mmsg data goes up as it is (protocol 0) and user
    // space classifies it, within the same L7_MAX_TRIES budget.
    if (conn && conn->proto == 0) {
        if (++conn->tries >= L7_MAX_TRIES)
            conn->proto = PROTO_NONE;
    } else if (!l7_pass(e, conn)) {
        return 0;
    }
#endif
    // TCP: later messages moved the stream position too; sum them to find each start.
    u64 total = 0;
    u32 cnt = ret < MAX_MMSG ? (u32)ret : MAX_MMSG;
    for (u32 i = 0; i < MAX_MMSG; i++) {
        // i hidden from clang, which otherwise folds the two exits into one bound (ret,
        // unknown) the verifier cannot follow: it then walked past its 1M-insn limit.
        asm volatile("" : "+r"(i));
        if (i >= cnt)
            break;
        u32 mlen = 0;  // struct mmsghdr { struct user_msghdr (56 bytes); u32 msg_len; } = 64
        bpf_probe_read_user(&mlen, 4, (void *)(args.ptr + (u64)i * 64 + 56));
        total += mlen;
    }
    u32 zero = 0;
    struct mmsg_state_t *st = mmsg_state.lookup(&zero);
    if (!st)
        return 0;
    st->ptr = args.ptr;
    st->sk = sk;
    st->conn_id = e->conn_id;
    st->total = total;
    st->done = 0;
    st->ret = ret;
    st->peek = (args.flags & MSG_PEEK) && dir == DIR_INGRESS;
    st->i = 0;
    st->rport = e->rport;  // the sock's own peer, restored before each message's msg_name
    st->dir = dir;
    st->l7_proto = e->l7_proto;
    st->l7_role = e->l7_role;
    st->cap = payload_cap(conn);
    __builtin_memcpy(st->raddr, e->raddr, 16);
    exit_progs.call(ctx, EXIT_MMSG_MSG);
    stat_inc(ST_TAILCALL_FAIL);
    return 0;
}

// One message of a recvmmsg/sendmmsg, then a tail call to itself for the next: the
// verifier checks one message's body instead of every message of an unrolled walk.
int mmsg_msg(struct exit_ctx *ctx) {
    u32 zero = 0;
    struct mmsg_state_t *st = mmsg_state.lookup(&zero);
    struct event_t *e = scratch.lookup(&zero);  // begin()'s record, still this CPU's
    if (!st || !e)
        return 0;
    u32 i = st->i;
    if (i >= MAX_MMSG || i >= st->ret)
        return 0;
    u64 m[4] = {};
    u32 mlen = 0;
    u64 base = st->ptr + (u64)i * 64;
    if (bpf_probe_read_user(m, sizeof(m), (void *)base) ||
        bpf_probe_read_user(&mlen, 4, (void *)(base + 56))) {
        stat_inc(ST_READ_FAIL);
        return 0;
    }
    u8 dir = st->dir;
    e->direction = dir;
    e->conn_id = st->conn_id;
    e->msg_index = i;
    e->ret = mlen;
    e->flags = 0;
    e->rport = st->rport;
    __builtin_memcpy(e->raddr, st->raddr, 16);
    // Fewer iovecs per message than a single call gets: each copy is walked per message.
    u32 cap = st->cap;
    e->payload_len = copy_iov(e, m[2], m[3], mlen, cap, MMSG_MAX_IOV);
    if (mlen > cap)
        e->flags |= F_TRUNC;
    set_seq(e, st->sk, dir, st->peek, st->total - st->done);
    st->done += mlen;
    if (e->l4 == L4_UDP && m[0])
        addr_from_user(m[0], e);
    e->l7_proto = st->l7_proto;
    e->l7_role = st->l7_role;
    submit(e);
    st->i = i + 1;
    if (i + 1 < st->ret && i + 1 < MAX_MMSG) {
        exit_progs.call(ctx, EXIT_MMSG_MSG);
        stat_inc(ST_TAILCALL_FAIL);
    } else if (st->ret > MAX_MMSG) {
        stat_inc(ST_MMSG_TRUNC);
    }
    return 0;
}

// Exit of socket/connect/accept/accept4: a record without payload, direction none.
int ctl_exit(struct exit_ctx *ctx) {
    u64 id = bpf_get_current_pid_tgid();
    struct inflight_t args, *store = take_args(ctx, &args);
    if (!store)
        return 0;
    if (args.sys == SYS_CONNECT) {
        // connect() may re-target a socket (a TCP one after connect(AF_UNSPEC)): the
        // addresses its entry keeps are read again at its next call.
        struct conn_key_t k = {.tgid = id >> 32, .fd = args.fd};
        struct conn_val_t *c = conns.lookup(&k);
        if (c)
            c->l4 = 0;
    }
#if L7_ENABLED
    // With L7 filtering only data of detected protocols (and their close) is sent, and
    // connect(): before any byte says the protocol, its time tells an event loop whose
    // request opened the connection (the linker's event_loop rule).
    if (args.sys != SYS_CONNECT)
        return 0;
#endif
    s64 ret = ctx->ret;
    u16 sys = args.sys;
    if (ret == -EAGAIN)
        return 0;
    // socket/accept return the new fd; connect acts on the given one.
    s32 fd = (sys == SYS_CONNECT) ? args.fd : (s32)ret;
    if (ret < 0 && sys != SYS_CONNECT)
        return 0;
    u64 sk = 0;
    struct conn_val_t *conn = 0;
    struct event_t *e = begin(id, fd, sys, args.ts, store, args.g, &sk, &conn);
    if (!e)
        return 0;
    e->loop_iter = loop_now((u32)id);
    e->atask = args.atask;
    e->direction = DIR_NONE;
    e->ret = ret;
    // A failed connect leaves no peer on the sock: report the address that was asked for.
    if (sys == SYS_CONNECT && e->rport == 0)
        addr_from_user(args.ptr, e);
    submit(e);
    return 0;
}

#if L7_ENABLED
// The record data_exit left in `scratch` and its connection, for the detector programs.
static __always_inline int l7_record(struct event_t **ep, struct conn_val_t **cp) {
    u32 zero = 0;
    struct event_t *e = scratch.lookup(&zero);
    if (!e)
        return 0;
    struct conn_key_t k = {.tgid = e->pid, .fd = e->fd};
    struct conn_val_t *c = conns.lookup(&k);
    if (!c)
        return 0;
    *ep = e;
    *cp = c;
    return 1;
}

// After protocol `idx`'s detector said `r` (L7_REQUEST/L7_RESPONSE, or 0): mark the
// connection and send the record, or hand it to the next protocol's program. Past the
// last one, the call counts as a try; L7_MAX_TRIES tries and the connection is given up.
static __always_inline int l7_step(void *ctx, struct event_t *e, struct conn_val_t *c,
                                   int r, u32 idx) {
    if (c->proto != 0)
        return 0;  // decided meanwhile by another thread's call
    if (r) {
        c->proto = idx;
        c->tries = 0;  // from now on it counts the records sent (l7_pass)
        // A request sent (or a response received) makes this process the client.
        c->role = ((r == L7_REQUEST) == (e->direction == DIR_EGRESS)) ? ROLE_CLIENT : ROLE_SERVER;
        if (l7_pass(e, c))
            submit(e);
        return 0;
    }
    l7_progs.call(ctx, idx);
    if (++c->tries >= L7_MAX_TRIES)
        c->proto = PROTO_NONE;
    return 0;
}
#endif

// Data syscalls. `fd` is declared unsigned for some of them; the cast keeps it signed.
TRACEPOINT_PROBE(syscalls, sys_exit_read) { return exit_args_then(args, SYS_READ, EXIT_DATA); }
TRACEPOINT_PROBE(syscalls, sys_exit_readv) { return exit_args_then(args, SYS_READV, EXIT_DATA); }
TRACEPOINT_PROBE(syscalls, sys_exit_recvfrom) { return exit_args_then(args, SYS_RECVFROM, EXIT_DATA); }
TRACEPOINT_PROBE(syscalls, sys_exit_recvmsg) { return exit_args_then(args, SYS_RECVMSG, EXIT_DATA); }
TRACEPOINT_PROBE(syscalls, sys_exit_recvmmsg) { return exit_args_then(args, SYS_RECVMMSG, EXIT_MMSG); }
TRACEPOINT_PROBE(syscalls, sys_enter_write) { return save_args(args->__syscall_nr, SYS_WRITE, (s32)args->fd, (u64)args->buf, 0, 0, 0); }
TRACEPOINT_PROBE(syscalls, sys_exit_write) { exit_progs.call(args, EXIT_DATA); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_writev) { return save_args(args->__syscall_nr, SYS_WRITEV, (s32)args->fd, (u64)args->vec, 0, args->vlen, 0); }
TRACEPOINT_PROBE(syscalls, sys_exit_writev) { exit_progs.call(args, EXIT_DATA); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_sendto) { return save_args(args->__syscall_nr, SYS_SENDTO, (s32)args->fd, (u64)args->buff, (u64)args->addr, 0, args->flags); }
TRACEPOINT_PROBE(syscalls, sys_exit_sendto) { exit_progs.call(args, EXIT_DATA); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_sendmsg) { return save_args(args->__syscall_nr, SYS_SENDMSG, (s32)args->fd, (u64)args->msg, 0, 0, args->flags); }
TRACEPOINT_PROBE(syscalls, sys_exit_sendmsg) { exit_progs.call(args, EXIT_DATA); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_sendmmsg) { return save_args(args->__syscall_nr, SYS_SENDMMSG, (s32)args->fd, (u64)args->mmsg, 0, args->vlen, args->flags); }
TRACEPOINT_PROBE(syscalls, sys_exit_sendmmsg) { exit_progs.call(args, EXIT_MMSG); return 0; }

// Connection management.
TRACEPOINT_PROBE(syscalls, sys_enter_socket) {
    if (args->family != AF_INET && args->family != AF_INET6)
        return 0;
    return save_args(args->__syscall_nr, SYS_SOCKET, 0, 0, 0, 0, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_socket) { exit_progs.call(args, EXIT_CTL); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_connect) { return save_args(args->__syscall_nr, SYS_CONNECT, (s32)args->fd, (u64)args->uservaddr, 0, 0, 0); }
TRACEPOINT_PROBE(syscalls, sys_exit_connect) { exit_progs.call(args, EXIT_CTL); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_accept) { return save_args(args->__syscall_nr, SYS_ACCEPT, (s32)args->fd, 0, 0, 0, 0); }
TRACEPOINT_PROBE(syscalls, sys_exit_accept) { exit_progs.call(args, EXIT_CTL); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_accept4) { return save_args(args->__syscall_nr, SYS_ACCEPT4, (s32)args->fd, 0, 0, 0, 0); }
TRACEPOINT_PROBE(syscalls, sys_exit_accept4) { exit_progs.call(args, EXIT_CTL); return 0; }

// close: report the socket while the fd still names it, and forget its connection entry
// (for every process: a thread the filter does not select may close a selected one's fd).
TRACEPOINT_PROBE(syscalls, sys_enter_close) {
    u64 id = bpf_get_current_pid_tgid();
    s32 fd = (s32)args->fd;
    if (fd < 0)
        return 0;
    struct conn_key_t k = {.tgid = id >> 32, .fd = fd};
    struct inflight_t *a = selected_thread();
    if (!a) {
        conns.delete(&k);
        return 0;
    }
    u64 sk = 0;
    struct conn_val_t *conn = 0;
    struct event_t *e = begin(id, fd, SYS_CLOSE, bpf_ktime_get_ns(), a, 0, &sk, &conn);
    if (!e) {
        conns.delete(&k);
        return 0;
    }
    e->loop_iter = loop_now((u32)id);
    e->atask = a->atask;
    e->direction = DIR_NONE;
    e->ret = 0;
#if L7_ENABLED
    int keep = conn && conn->proto != 0 && conn->proto != PROTO_NONE;
    if (conn) {
        e->l7_proto = conn->proto;
        e->l7_role = conn->role;
    }
#else
    int keep = 1;
#endif
    conns.delete(&k);
    if (keep)
        submit(e);
    return 0;
}

// dup2/dup3 close whatever newfd named: its entry goes, as on close().
static __always_inline int forget_fd(s64 fd) {
    struct conn_key_t k = {.tgid = bpf_get_current_pid_tgid() >> 32, .fd = (s32)fd};
    if (fd >= 0)
        conns.delete(&k);
    return 0;
}
TRACEPOINT_PROBE(syscalls, sys_enter_dup2) { return forget_fd(args->newfd); }
TRACEPOINT_PROBE(syscalls, sys_enter_dup3) { return forget_fd(args->newfd); }

// -- The execution unit: loop iterations and asyncio tasks --------------------------------
// An event loop's iteration is one return of its wait: counted per thread here (in
// loop_slots, no record), carried on each socket record as loop_iter.
#if LOOP_COUNTER_ENABLED
static __always_inline int loop_tick(void) {
    u32 tid = (u32)bpf_get_current_pid_tgid(), idx = tid & (LOOP_SLOTS - 1);
    struct loop_slot_t *s = loop_slots.lookup(&idx);
    if (!s || !tid)
        return 0;
    if (s->tid[0] == tid) {
        s->n[0] += 1;
    } else if (s->tid[1] == tid) {
        s->n[1] += 1;
    } else {  // the newest thread in way 0, the one there before it in way 1
        if (s->tid[1])
            stat_inc(ST_LOOP_SLOT_TAKEN);
        s->tid[1] = s->tid[0];
        s->n[1] = s->n[0];
        s->tid[0] = tid;
        s->n[0] = 1;
    }
    return 0;
}
TRACEPOINT_PROBE(syscalls, sys_exit_epoll_wait) { return loop_tick(); }
TRACEPOINT_PROBE(syscalls, sys_exit_epoll_pwait) { return loop_tick(); }
#if HAVE_EPOLL_PWAIT2
TRACEPOINT_PROBE(syscalls, sys_exit_epoll_pwait2) { return loop_tick(); }
#endif
#endif  // LOOP_COUNTER_ENABLED

#if ASYNCIO_ENABLED
// CPython's _asyncio (asyncio.py finds the functions in its symbol table): the entry of
// task_step_impl (one step of a Task; its TaskObj * is argument `n`, which differs between
// Python versions) makes that task current on the thread, its return restores the one it
// interrupted. A Task's __init__ names its creator: the task current then (0: none), sent
// as a task_edge_t record on the events ring (a record's length tells it from event_t's).
struct task_edge_t { u64 ts; u64 child; u64 parent; u32 pid; u32 tid; };

static __always_inline int step_enter(u64 task) {
    struct inflight_t *a = inflight.task_storage_get(bpf_get_current_task_btf(), 0,
                                                     BPF_LOCAL_STORAGE_GET_F_CREATE);
    if (!a)
        return 0;
    u32 d = a->atask_depth;
    if (d < 4)
        a->atask_saved[d & 3] = a->atask;
    else
        stat_inc(ST_TASK_DEPTH);
    a->atask_depth = d + 1;
    a->atask = task;
    return 0;
}
int asyncio_step_enter_0(struct pt_regs *ctx) { return step_enter(PT_REGS_PARM1(ctx)); }
int asyncio_step_enter_1(struct pt_regs *ctx) { return step_enter(PT_REGS_PARM2(ctx)); }
int asyncio_step_enter_2(struct pt_regs *ctx) { return step_enter(PT_REGS_PARM3(ctx)); }

int asyncio_step_return(struct pt_regs *ctx) {
    struct inflight_t *a = inflight.task_storage_get(bpf_get_current_task_btf(), 0, 0);
    if (!a)
        return 0;
    u32 d = a->atask_depth;
    if (d == 0) {  // a step that was running when the probe attached
        a->atask = 0;
        return 0;
    }
    d -= 1;
    a->atask_depth = d;
    a->atask = d < 4 ? a->atask_saved[d & 3] : 0;
    return 0;
}

int asyncio_task_init(struct pt_regs *ctx) {
    struct inflight_t *a = selected_thread();   // edges only for traced processes
    if (!a)
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    struct task_edge_t r = {.ts = bpf_ktime_get_ns(), .child = PT_REGS_PARM1(ctx),
                            .parent = a->atask, .pid = id >> 32, .tid = (u32)id};
    if (events.ringbuf_output(&r, sizeof(r), BPF_RB_NO_WAKEUP))
        stat_inc(ST_RB_FULL);
    else
        stat_inc(ST_TASK_EDGES);
    return 0;
}
#endif
