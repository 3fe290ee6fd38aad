// log2hist.bpf.h: log2 histogram buckets with a count and a sum each. The includer
// defines NSLOTS (slot NSLOTS is the +Inf bucket) and includes stats.bpf.h first.
struct hist_val_t { u64 count; u64 sum; };

// Smallest k with v <= 2^k (so the bucket bound 2^k is inclusive, as OpenTelemetry's).
static __always_inline u32 slot_of(u64 v) {
    if (v <= 1)
        return 0;
    u32 s = bpf_log2l(v - 1);
    return s > NSLOTS ? NSLOTS : s;
}

// Bucket values are updated from every CPU: atomic adds.
static __always_inline void hist_count(struct hist_val_t *h, u64 v) {
    __sync_fetch_and_add(&h->count, 1);
    __sync_fetch_and_add(&h->sum, v);
}

// v into `h`, a bucket a map's lookup_or_try_init returned; where that found the map
// full (no bucket), one more in stats slot `full` instead.
static __always_inline void hist_count_or_full(struct hist_val_t *h, u64 v, u32 full) {
    if (h)
        hist_count(h, v);
    else
        stat_inc(full);
}
