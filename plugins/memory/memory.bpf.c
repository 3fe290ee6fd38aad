// memory.bpf.c: page faults, resident memory and OOM kills per process (optionally page
// allocations), aggregated in the kernel; OOM kills also go out as events.
//
// Tracepoints: exceptions:page_fault_user, exceptions:page_fault_kernel, kmem:rss_stat,
// oom:mark_victim, sched:sched_process_exec, sched:sched_process_exit, and, when enabled,
// kmem:mm_page_alloc. Major/minor fault counts come from the perf software events
// page-faults-min / page-faults-maj (a BPF program per event, sample period 1).
// Kernel structs are read only at BTF offsets (OFF_<struct>__<member>).
//
// kmem:rss_stat fires whenever an mm's RSS counter changes, with `size` the counter's
// value in BYTES (the format prints "size=%ldB"; the kernel shifts pages by PAGE_SHIFT)
// and `curr` set when the mm is the current task's. It is the kernel's per-CPU counter
// read (percpu_counter_read_positive), so it may lag the exact sum by a batch per CPU.
//
// Compile-time knobs (set by probe.py): MAX_PROCS, MAX_MMS, RINGBUF_PAGES, PAGE_ALLOC,
// FAULT_TYPES, PAGE_SIZE_BYTES, HAVE_GROUP_DEAD.

enum { MM_FILEPAGES = 0, MM_ANONPAGES, MM_SWAPENTS, MM_SHMEMPAGES, NR_MM_COUNTERS };

// Counter slots of the per-CPU `stats` array; probe.py mirrors the names.
enum { ST_PROC_FULL = 0, ST_MM_FULL, ST_EXIT_FULL, ST_RSS_UNKNOWN_MM, ST_OOM_EVENTS,
       ST_RB_FULL, ST_NSTATS };
#include "deeptrace_core/stats.bpf.h"

struct proc_t {
    u64 faults_user;       // exceptions:page_fault_user
    u64 faults_kernel;     // exceptions:page_fault_kernel (kernel mode, e.g. copy_to_user)
    u64 faults_minor;      // perf page-faults-min
    u64 faults_major;      // perf page-faults-maj
    u64 alloc_bytes;       // kmem:mm_page_alloc, PAGE_SIZE << order (when enabled)
    s64 rss[NR_MM_COUNTERS];  // latest kmem:rss_stat size per member, bytes
    u32 mm_id;             // the mm the rss figures belong to (exec replaces it)
    u32 pad;
    char comm[16];         // the thread-group leader's comm
};
BPF_HASH(procs, u32, struct proc_t, MAX_PROCS);

// mm_id -> tgid, learnt from rss_stat events with curr=1, to place curr=0 updates (an mm
// changed by another task: reclaim, fork's copy, final teardown).
BPF_HASH(mm_owner, u32, u32, MAX_MMS);

BPF_HASH(exited, u32, u64, MAX_PROCS);

struct oom_event_t {
    u64 ts;
    u64 total_vm;      // kB, as the tracepoint reports
    u64 anon_rss;      // kB
    u64 file_rss;      // kB
    u64 shmem_rss;     // kB
    u64 pgtables;      // kB
    u64 cgroup_id;     // of the triggering task
    u32 victim_pid;
    u32 trigger_pid;   // tgid of the task that ran out of memory (current)
    u32 trigger_tid;
    u32 uid;
    s16 oom_score_adj;
    u8 pad[6];
    char victim_comm[16];
    char trigger_comm[16];
};
BPF_RINGBUF_OUTPUT(oom_events, RINGBUF_PAGES);

#include "deeptrace_core/process.bpf.h"

TRACEPOINT_PROBE(exceptions, page_fault_user) {
    struct proc_t *p = proc_entry(current_tgid());
    if (p)
        __sync_fetch_and_add(&p->faults_user, 1);
    return 0;
}

// The process a fault is charged to: none (0) in idle/irq context (tgid 0, a fault on a
// kernel address), nor when the process map is full.
static __always_inline struct proc_t *fault_owner(void) {
    u32 tgid = current_tgid();
    return tgid ? proc_entry(tgid) : 0;
}

TRACEPOINT_PROBE(exceptions, page_fault_kernel) {
    struct proc_t *p = fault_owner();
    if (p)
        __sync_fetch_and_add(&p->faults_kernel, 1);
    return 0;
}

#if FAULT_TYPES
int on_fault_minor(struct bpf_perf_event_data *ctx) {
    struct proc_t *p = fault_owner();
    if (p)
        __sync_fetch_and_add(&p->faults_minor, 1);
    return 0;
}

int on_fault_major(struct bpf_perf_event_data *ctx) {
    struct proc_t *p = fault_owner();
    if (p)
        __sync_fetch_and_add(&p->faults_major, 1);
    return 0;
}
#endif

TRACEPOINT_PROBE(kmem, rss_stat) {
    int member = args->member;
    if (member < 0 || member >= NR_MM_COUNTERS)
        return 0;
    u32 mm_id = args->mm_id;
    s64 size = args->size;
    struct proc_t *p;
    if (args->curr) {
        u32 tgid = current_tgid();
        if (!tgid)
            return 0;
        p = proc_entry(tgid);
        if (!p)
            return 0;
        if (p->mm_id != mm_id) {
            // First figure of this mm for the process (first sight, or exec): the
            // other members belong to the old mm, start them afresh.
            if (p->mm_id)
                mm_owner.delete(&p->mm_id);
            p->mm_id = mm_id;
            #pragma unroll
            for (int i = 0; i < NR_MM_COUNTERS; i++)
                p->rss[i] = 0;
            if (mm_owner.update(&mm_id, &tgid))
                stat_inc(ST_MM_FULL);
        }
    } else {
        u32 *owner = mm_owner.lookup(&mm_id);
        if (!owner) {
            stat_inc(ST_RSS_UNKNOWN_MM);
            return 0;
        }
        u32 tgid = *owner;
        p = procs.lookup(&tgid);
        if (!p || p->mm_id != mm_id)
            return 0;
    }
    switch (member) {
    case MM_FILEPAGES: p->rss[MM_FILEPAGES] = size; break;
    case MM_ANONPAGES: p->rss[MM_ANONPAGES] = size; break;
    case MM_SWAPENTS: p->rss[MM_SWAPENTS] = size; break;
    default: p->rss[MM_SHMEMPAGES] = size; break;
    }
    return 0;
}

#if PAGE_ALLOC
TRACEPOINT_PROBE(kmem, mm_page_alloc) {
    u32 tgid = current_tgid();
    if (!tgid)
        return 0;
    struct proc_t *p = proc_entry(tgid);
    u32 order = args->order;
    if (p && order < 32)
        __sync_fetch_and_add(&p->alloc_bytes, (u64)PAGE_SIZE_BYTES << order);
    return 0;
}
#endif

TRACEPOINT_PROBE(oom, mark_victim) {
    stat_inc(ST_OOM_EVENTS);
    struct oom_event_t *e = oom_events.ringbuf_reserve(sizeof(struct oom_event_t));
    if (!e) {
        stat_inc(ST_RB_FULL);
        return 0;
    }
    u64 id = bpf_get_current_pid_tgid();
    e->ts = bpf_ktime_get_ns();
    e->total_vm = args->total_vm;
    e->anon_rss = args->anon_rss;
    e->file_rss = args->file_rss;
    e->shmem_rss = args->shmem_rss;
    e->pgtables = args->pgtables;
    e->cgroup_id = bpf_get_current_cgroup_id();
    e->victim_pid = args->pid;
    e->trigger_pid = id >> 32;
    e->trigger_tid = (u32)id;
    e->uid = args->uid;
    e->oom_score_adj = args->oom_score_adj;
    __builtin_memset(e->pad, 0, sizeof(e->pad));
    __builtin_memset(e->victim_comm, 0, sizeof(e->victim_comm));
    TP_DATA_LOC_READ_STR(e->victim_comm, comm, sizeof(e->victim_comm));
    leader_comm(e->trigger_comm);
    oom_events.ringbuf_submit(e, 0);
    return 0;
}
