// process.bpf.h: per-process (tgid) entries, created on first sight and named by the
// thread-group leader, and the end of a process. The includer first defines
// struct proc_t (with char comm[16]), BPF_HASH procs (tgid -> proc_t) and exited (tgid
// -> ktime of the exit, read by proccounters.exits), ST_PROC_FULL and ST_EXIT_FULL
// (stats.bpf.h); the agent passes OFF_task_struct__group_leader/__comm and
// HAVE_GROUP_DEAD.

static __always_inline u32 current_tgid(void) {
    return bpf_get_current_pid_tgid() >> 32;
}

static __always_inline void leader_comm(char *comm) {
    u64 task = (u64)bpf_get_current_task();
    u64 leader = 0;
    bpf_probe_read_kernel(&leader, sizeof(leader), (void *)(task + OFF_task_struct__group_leader));
    if (!leader || bpf_probe_read_kernel_str(comm, 16, (void *)(leader + OFF_task_struct__comm)) < 0)
        bpf_get_current_comm(comm, 16);
}

// The current process's entry, created on first sight (call only where current is a
// thread of `tgid`).
static __always_inline struct proc_t *proc_entry(u32 tgid) {
    struct proc_t *p = procs.lookup(&tgid);
    if (p)
        return p;
    struct proc_t z = {};
    leader_comm(z.comm);
    procs.insert(&tgid, &z);
    p = procs.lookup(&tgid);
    if (!p)
        stat_inc(ST_PROC_FULL);
    return p;
}

// exec renames the process (current is the new leader, comm already set).
TRACEPOINT_PROBE(sched, sched_process_exec) {
    u32 tgid = current_tgid();
    struct proc_t *p = procs.lookup(&tgid);
    if (p)
        bpf_get_current_comm(&p->comm, sizeof(p->comm));
    return 0;
}

// The last thread of a process: its figures are final from now on.
TRACEPOINT_PROBE(sched, sched_process_exit) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
#if HAVE_GROUP_DEAD
    if (!args->group_dead)
        return 0;
#else
    if ((u32)id != tgid)
        return 0;
#endif
    if (!procs.lookup(&tgid))
        return 0;
    u64 now = bpf_ktime_get_ns();
    if (exited.update(&tgid, &now))
        stat_inc(ST_EXIT_FULL);
    return 0;
}
