// disk.bpf.c: block I/O per device and per process, aggregated in the kernel.
//
// Tracepoints only: block:block_rq_insert (queued to the I/O scheduler, in the submitter's
// context), block:block_rq_issue (sent to the driver), block:block_rq_complete (done),
// and, to keep the in-flight keys right, block:block_rq_requeue, block:block_rq_merge
// (a request absorbed by another) and block:block_bio_frontmerge (a request's start
// moved). Their `args->` fields come from the tracefs format files, so no kernel struct
// is read here at all. A request in flight is keyed by (dev, sector); the process that
// submitted it is `current` at its insert (or, without one, its issue), remembered in
// the in-flight entry.
//
// Compile-time knobs (set by probe.py): INFLIGHT_MAX, PROC_MAX, HIST_MAX, NSLOTS.

// Directions; probe.py mirrors this table.
enum { DIR_READ = 0, DIR_WRITE, DIR_DISCARD, DIR_FLUSH, DIR_OTHER };
// Device histograms.
enum { H_LATENCY = 0, H_QUEUE, H_SIZE };

// Counters by cause; probe.py mirrors the names.
// ST_LOST_COMPLETION: a new request found the entry of an earlier one at its position
// still issued: that completion never reached this program. Besides map overflows and
// recursion (counted by the kernel per program), the kernel drops tracepoint events
// silently when its perf recursion guard is taken (seen here for block_rq_complete in
// softirq over some tasks); this is how such losses show.
enum { ST_COMPLETED = 0, ST_INFLIGHT_FULL, ST_PROC_MAP_FULL, ST_HIST_MAP_FULL,
       ST_UNMATCHED, ST_NO_ISSUE, ST_LOST_COMPLETION, ST_NSTATS };
#include "deeptrace_core/stats.bpf.h"

struct rq_key_t { u32 dev; u32 pad; u64 sector; };
struct rq_val_t {
    u64 ts_insert;    // 0: insert not seen (no scheduler, or requeued)
    u64 ts_issue;     // 0: not issued yet
    u32 tgid;
    u32 requeued;
    char comm[16];
};
BPF_HASH(inflight, struct rq_key_t, struct rq_val_t, INFLIGHT_MAX);
// Partition dev_t -> whole-disk dev_t, filled by probe.py from /sys/class/block.
BPF_HASH(part_to_disk, u32, u32, 1024);

// Bytes and operations per (process, device, direction).
struct proc_key_t { u32 tgid; u32 dev; u32 dir; char comm[16]; };
struct io_val_t { u64 bytes; u64 ops; };
BPF_HASH(proc_io, struct proc_key_t, struct io_val_t, PROC_MAX);

// log2 histograms: per (process, direction) of the latency issue -> complete, and per
// (device, direction) of latency, queue time (insert -> issue) and request size.
struct phist_key_t { u32 tgid; u16 dir; u16 slot; char comm[16]; };
struct dhist_key_t { u32 dev; u8 kind; u8 dir; u16 slot; };
#include "deeptrace_core/log2hist.bpf.h"
BPF_HASH(proc_hist, struct phist_key_t, struct hist_val_t, HIST_MAX);
BPF_HASH(dev_hist, struct dhist_key_t, struct hist_val_t, HIST_MAX);

// rwbs: 'F' if preflush, then the operation: R, W, D (discard), F (REQ_OP_FLUSH), N...
static __always_inline u32 direction(const char *rwbs, u32 nr_sector) {
    char c = rwbs[0];
    if (c == 'F') {
        c = rwbs[1];
        if (c == 'F' || c == 'N' || c == 0)
            return DIR_FLUSH;
    }
    if (c == 'R') return DIR_READ;
    if (c == 'W') return nr_sector ? DIR_WRITE : DIR_FLUSH;   // an empty write: a flush
    if (c == 'D') return DIR_DISCARD;
    return DIR_OTHER;
}

// Latency slots are in microseconds, rounded up: ns <= 1000 * 2^slot.
static __always_inline u32 us_slot(u64 ns) {
    return slot_of((ns + 999) / 1000);
}

static __always_inline void dhist_add(u32 dev, u8 kind, u8 dir, u32 slot, u64 v) {
    struct dhist_key_t k = {.dev = dev, .kind = kind, .dir = dir, .slot = slot};
    struct hist_val_t zero = {};
    hist_count_or_full(dev_hist.lookup_or_try_init(&k, &zero), v, ST_HIST_MAP_FULL);
}

static __always_inline void phist_add(struct rq_val_t *rq, u16 dir, u32 slot, u64 v) {
    struct phist_key_t k = {.tgid = rq->tgid, .dir = dir, .slot = slot};
    __builtin_memcpy(k.comm, rq->comm, sizeof(k.comm));
    struct hist_val_t zero = {};
    hist_count_or_full(proc_hist.lookup_or_try_init(&k, &zero), v, ST_HIST_MAP_FULL);
}

static __always_inline struct rq_val_t *fresh(struct rq_key_t *k) {
    struct rq_val_t v = {.tgid = bpf_get_current_pid_tgid() >> 32};
    bpf_get_current_comm(&v.comm, sizeof(v.comm));
    if (inflight.update(k, &v)) {
        stat_inc(ST_INFLIGHT_FULL);
        return 0;
    }
    return inflight.lookup(k);
}

// A request enters the scheduler: a new request at this position, unless it is one of
// ours coming back from a requeue (possibly re-inserted by a kworker: keep its owner).
TRACEPOINT_PROBE(block, block_rq_insert) {
    struct rq_key_t k = {.dev = args->dev, .sector = args->sector};
    struct rq_val_t *rq = inflight.lookup(&k);
    if (rq && !rq->requeued && rq->ts_issue)
        stat_inc(ST_LOST_COMPLETION);
    if (!rq || !rq->requeued)
        rq = fresh(&k);
    if (rq) {
        rq->ts_insert = bpf_ktime_get_ns();
        rq->ts_issue = 0;
        rq->requeued = 0;
    }
    return 0;
}

// To the driver. Without a scheduler (or for flushes) there was no insert: the request
// is new, and current is its submitter. An entry already issued is stale (its completion
// was missed): replace it.
TRACEPOINT_PROBE(block, block_rq_issue) {
    struct rq_key_t k = {.dev = args->dev, .sector = args->sector};
    struct rq_val_t *rq = inflight.lookup(&k);
    if (rq && rq->ts_issue)
        stat_inc(ST_LOST_COMPLETION);
    if (!rq || rq->ts_issue)
        rq = fresh(&k);
    if (rq)
        rq->ts_issue = bpf_ktime_get_ns();
    return 0;
}

TRACEPOINT_PROBE(block, block_rq_requeue) {
    struct rq_key_t k = {.dev = args->dev, .sector = args->sector};
    struct rq_val_t *rq = inflight.lookup(&k);
    if (rq) {
        rq->requeued = 1;
        rq->ts_issue = 0;
    }
    return 0;
}

// `next` was merged into the request before it: it will never be issued on its own.
TRACEPOINT_PROBE(block, block_rq_merge) {
    struct rq_key_t k = {.dev = args->dev, .sector = args->sector};
    inflight.delete(&k);
    return 0;
}

// A bio joined the front of a queued request, which now starts at the bio's sector:
// move the entry. Bio tracepoints name the partition, request ones the whole disk.
TRACEPOINT_PROBE(block, block_bio_frontmerge) {
    u32 dev = args->dev;
    u32 *whole = part_to_disk.lookup(&dev);
    if (whole)
        dev = *whole;
    struct rq_key_t old = {.dev = dev, .sector = args->sector + args->nr_sector};
    struct rq_val_t *rq = inflight.lookup(&old);
    if (!rq)
        return 0;
    struct rq_val_t v = *rq;
    struct rq_key_t k = {.dev = dev, .sector = args->sector};
    inflight.delete(&old);
    if (inflight.update(&k, &v))
        stat_inc(ST_INFLIGHT_FULL);
    return 0;
}

TRACEPOINT_PROBE(block, block_rq_complete) {
    u64 now = bpf_ktime_get_ns();
    struct rq_key_t k = {.dev = args->dev, .sector = args->sector};
    struct rq_val_t *rq = inflight.lookup(&k);
    if (!rq) {                       // issued before we attached, or its entry was lost
        stat_inc(ST_UNMATCHED);
        return 0;
    }
    struct rq_val_t v = *rq;
    inflight.delete(&k);
    if (!v.ts_issue) {               // completed without an issue we saw
        stat_inc(ST_NO_ISSUE);
        return 0;
    }
    stat_inc(ST_COMPLETED);
    u32 dir = direction(args->rwbs, args->nr_sector);
    u64 bytes = (u64)args->nr_sector << 9;
    u64 lat = now - v.ts_issue;
    u32 ls = us_slot(lat);
    dhist_add(k.dev, H_LATENCY, dir, ls, lat);
    dhist_add(k.dev, H_SIZE, dir, slot_of(bytes), bytes);
    if (v.ts_insert && v.ts_insert <= v.ts_issue) {
        u64 q = v.ts_issue - v.ts_insert;
        dhist_add(k.dev, H_QUEUE, dir, us_slot(q), q);
    }
    phist_add(&v, dir, ls, lat);

    struct proc_key_t pk = {.tgid = v.tgid, .dev = k.dev, .dir = dir};
    __builtin_memcpy(pk.comm, v.comm, sizeof(pk.comm));
    struct io_val_t *io = proc_io.lookup(&pk);
    if (!io) {
        struct io_val_t zero = {};
        proc_io.insert(&pk, &zero);
        io = proc_io.lookup(&pk);
        if (!io) {
            stat_inc(ST_PROC_MAP_FULL);
            return 0;
        }
    }
    __sync_fetch_and_add(&io->bytes, bytes);
    __sync_fetch_and_add(&io->ops, 1);
    return 0;
}
