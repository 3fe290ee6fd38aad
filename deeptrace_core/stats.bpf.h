// stats.bpf.h: a probe's counters (losses by cause, events), a per-CPU array that
// bpf.counters() sums by slot. The includer first defines its slots, ST_NSTATS last.
BPF_PERCPU_ARRAY(stats, u64, ST_NSTATS);

static __always_inline void stat_inc(u32 idx) {
    u64 *v = stats.lookup(&idx);
    if (v) *v += 1;
}

// One more in `c`, a counter a map's lookup_or_try_init returned; where that found the
// map full (no counter), one more in slot `full` instead.
static __always_inline void count_or_full(u64 *c, u32 full) {
    if (c)
        __sync_fetch_and_add(c, 1);
    else
        stat_inc(full);
}
