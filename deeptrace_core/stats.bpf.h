// stats.bpf.h: a probe's counters (losses by cause, events), a per-CPU array that
// bpf.counters() sums by slot. The includer first defines its slots, ST_NSTATS last.
BPF_PERCPU_ARRAY(stats, u64, ST_NSTATS);

static __always_inline void stat_inc(u32 idx) {
    u64 *v = stats.lookup(&idx);
    if (v) *v += 1;
}
