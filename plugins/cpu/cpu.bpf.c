// cpu.bpf.c: on-CPU time, context switches and run-queue latency per process, plus an
// optional sampling profiler (perf cpu-clock -> user+kernel stacks).
//
// Tracepoints only: sched:sched_switch, sched:sched_wakeup, sched:sched_wakeup_new,
// sched:sched_process_exec, sched:sched_process_exit. Everything is aggregated here, in
// maps that probe.py reads once per collection interval; no per-event record leaves the
// kernel. Kernel structs are read only at BTF offsets (OFF_<struct>__<member>).
//
// Attribution: the tracepoint gives thread ids (prev_pid/next_pid). At sched_switch the
// current task IS prev (the kernel asserts it), so prev's process is
// bpf_get_current_pid_tgid() >> 32. Whatever belongs to `next` (its switch-in time and
// its run-queue wait) is parked in a per-CPU slot and charged to its process at its own
// switch-out, on the same CPU, when it is current. No tid -> tgid map is needed.
//
// Compile-time knobs (set by probe.py): MAX_PROCS, MAX_THREADS, HIST_MIN_SLOT,
// HIST_MAX_SLOT, HAVE_GROUP_DEAD, PROFILE, STACK_ENTRIES, PROFILE_KEYS, SELF_TGID.

#define TASK_REPORT_MAX 0x100   // prev_state bit the tracepoint sets for a preempted task
#define EFAULT 14
#define EEXIST 17

// Counter slots of the per-CPU `stats` array; probe.py mirrors the names.
enum { ST_SWITCHES = 0, ST_PROC_FULL, ST_WAKE_FULL, ST_HIST_FULL, ST_EXIT_FULL,
       ST_SWITCH_UNSEEN, ST_SAMPLES, ST_STACK_LOST, ST_STACK_COLLISION, ST_PROFILE_FULL,
       ST_NSTATS };
#include "deeptrace_core/stats.bpf.h"

// Per process (tgid). Updated from every CPU: atomic adds.
struct proc_t {
    u64 cpu_ns;        // on-CPU time, charged at switch-out
    u64 voluntary;     // switched out while blocking (prev_state != running)
    u64 involuntary;   // switched out while runnable (preempted, or yielded)
    u64 rq_count;      // run-queue waits measured (wake-up or preemption -> run)
    u64 rq_sum_ns;
    char comm[16];     // the thread-group leader's comm (the process name)
};
BPF_HASH(procs, u32, struct proc_t, MAX_PROCS);

// Run-queue latency, log2 buckets of nanoseconds: slot = bpf_log2l(ns) clamped to
// [HIST_MIN_SLOT, HIST_MAX_SLOT]; slot s holds values below 2^s ns.
struct hist_key_t { u32 tgid; u32 slot; };
BPF_HASH(rq_hist, struct hist_key_t, u64, MAX_PROCS * 8);

// When each runnable-but-not-running thread became runnable (wake-up or preemption).
BPF_HASH(wake_ts, u32, u64, MAX_THREADS);

// Processes whose last thread exited (value: ktime of the exit); probe.py reads their
// final figures, then deletes their entries everywhere.
BPF_HASH(exited, u32, u64, MAX_PROCS);

// What runs on this CPU now: since when, which thread, and the run-queue wait it had.
struct cpu_state_t {
    u64 ts;            // switch-in time of `tid`
    u64 rq_delta;      // its run-queue wait, charged at its switch-out
    u32 tid;
    u32 rq_pending;
};
BPF_PERCPU_ARRAY(cpu_state, struct cpu_state_t, 1);

#include "deeptrace_core/process.bpf.h"

static __always_inline void hist_add(u32 tgid, u64 ns) {
    u32 slot = bpf_log2l(ns);
    if (slot < HIST_MIN_SLOT)
        slot = HIST_MIN_SLOT;
    if (slot > HIST_MAX_SLOT)
        slot = HIST_MAX_SLOT;
    struct hist_key_t k = {.tgid = tgid, .slot = slot};
    u64 zero = 0;
    count_or_full(rq_hist.lookup_or_try_init(&k, &zero), ST_HIST_FULL);
}

static __always_inline void mark_runnable(u32 tid) {
    u64 now = bpf_ktime_get_ns();
    if (wake_ts.update(&tid, &now))
        stat_inc(ST_WAKE_FULL);
}

TRACEPOINT_PROBE(sched, sched_wakeup) {
    u32 tid = args->pid;
    if (tid)
        mark_runnable(tid);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_wakeup_new) {
    u32 tid = args->pid;
    if (tid)
        mark_runnable(tid);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_switch) {
    u32 zero = 0;
    struct cpu_state_t *cs = cpu_state.lookup(&zero);
    if (!cs)
        return 0;
    u64 now = bpf_ktime_get_ns();
    u32 prev = args->prev_pid;
    u32 next = args->next_pid;
    long state = args->prev_state;
    // Preempted (R+), or switched out while still running (sched_yield): involuntary,
    // as the kernel's own nivcsw counts it.
    int invol = state == 0 || (state & TASK_REPORT_MAX);
    stat_inc(ST_SWITCHES);

    if (prev) {   // tid 0 is the idle task of this CPU
        u32 tgid = current_tgid();
        struct proc_t *p = proc_entry(tgid);
        int mine = cs->ts && cs->tid == prev;
        if (cs->ts && !mine)
            stat_inc(ST_SWITCH_UNSEEN);
        if (p) {
            if (mine && now > cs->ts)
                __sync_fetch_and_add(&p->cpu_ns, now - cs->ts);
            if (invol)
                __sync_fetch_and_add(&p->involuntary, 1);
            else
                __sync_fetch_and_add(&p->voluntary, 1);
            if (mine && cs->rq_pending) {
                __sync_fetch_and_add(&p->rq_count, 1);
                __sync_fetch_and_add(&p->rq_sum_ns, cs->rq_delta);
                hist_add(tgid, cs->rq_delta);
            }
        }
        if (invol)   // still runnable: its wait for the CPU starts now
            mark_runnable(prev);
    }

    cs->rq_pending = 0;
    if (next) {
        u64 *t = wake_ts.lookup(&next);
        if (t) {
            if (now > *t) {
                cs->rq_delta = now - *t;
                cs->rq_pending = 1;
            }
            wake_ts.delete(&next);
        }
    }
    cs->ts = now;
    cs->tid = next;
    return 0;
}

#if PROFILE
// Sampling profiler: one sample per CPU every 1/PROFILE_HZ s of cpu-clock.
struct stack_key_t {
    u32 tgid;
    s32 user_stack;     // stack id, or -errno (-EFAULT: none, e.g. kernel thread)
    s32 kernel_stack;   // stack id, or -errno (-EFAULT: none, sampled in user mode)
    char comm[16];
};
BPF_STACK_TRACE(stack_traces, STACK_ENTRIES);
BPF_HASH(profile_counts, struct stack_key_t, u64, PROFILE_KEYS);

static __always_inline void stack_error(s32 id) {
    if (id == -EEXIST)
        stat_inc(ST_STACK_COLLISION);
    else if (id < 0 && id != -EFAULT)
        stat_inc(ST_STACK_LOST);
}

int on_cpu_sample(struct bpf_perf_event_data *ctx) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if ((u32)id == 0 || tgid == SELF_TGID)   // idle, or the agent itself
        return 0;
    stat_inc(ST_SAMPLES);
    struct stack_key_t k = {.tgid = tgid};
    struct proc_t *p = procs.lookup(&tgid);
    if (p)
        __builtin_memcpy(k.comm, p->comm, sizeof(k.comm));
    else
        leader_comm(k.comm);
    k.user_stack = stack_traces.get_stackid(ctx, BPF_F_USER_STACK);
    k.kernel_stack = stack_traces.get_stackid(ctx, 0);
    stack_error(k.user_stack);
    stack_error(k.kernel_stack);
    u64 zero = 0;
    count_or_full(profile_counts.lookup_or_try_init(&k, &zero), ST_PROFILE_FULL);
    return 0;
}
#endif
