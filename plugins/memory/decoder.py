"""Decodes memory.bpf.c's ``struct oom_event_t`` into :class:`OomEvent`.

The struct layout below mirrors the C struct field by field; change both together.
"""

import struct
import time

import attrs

# struct oom_event_t: ts, total_vm, anon_rss, file_rss, shmem_rss, pgtables, cgroup_id,
# victim_pid, trigger_pid, trigger_tid, uid, oom_score_adj, pad[6], victim_comm,
# trigger_comm.
OOM_EVENT = struct.Struct("<7Q4Ih6x16s16s")
assert OOM_EVENT.size == 112

# Counter slots of the per-CPU `stats` array, in C enum order.
STAT_NAMES = ("proc_map_full", "mm_map_full", "exit_map_full", "rss_unknown_mm", "oom_events",
              "ringbuf_full")

# bpf_ktime_get_ns() is CLOCK_MONOTONIC; records carry wall-clock ns.
_MONO_TO_WALL = time.time_ns() - time.monotonic_ns()


def _cstr(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode("utf-8", "replace")


@attrs.define(slots=True)
class OomEvent:
    """The kernel's OOM killer chose a victim (oom:mark_victim)."""

    time_ns: int            # wall clock
    victim_pid: int         # the killed task's pid (tid as the kernel reports it)
    victim_comm: str
    trigger_pid: int        # the process that ran out of memory (current at the kill)
    trigger_tid: int
    trigger_comm: str
    total_vm_kb: int        # victim's sizes at the kill, as the tracepoint reports them
    anon_rss_kb: int
    file_rss_kb: int
    shmem_rss_kb: int
    pgtables_kb: int
    uid: int
    oom_score_adj: int
    cgroup_id: int          # cgroup v2 id of the triggering task

    kind = "oom"

    def to_dict(self) -> dict:
        return {"kind": self.kind, **attrs.asdict(self)}

    def line(self) -> str:
        return (f"oom-kill victim={self.victim_comm}({self.victim_pid}) "
                f"by={self.trigger_comm}({self.trigger_pid}/{self.trigger_tid}) "
                f"anon-rss={self.anon_rss_kb}kB file-rss={self.file_rss_kb}kB "
                f"shmem-rss={self.shmem_rss_kb}kB total-vm={self.total_vm_kb}kB "
                f"pgtables={self.pgtables_kb}kB uid={self.uid} "
                f"oom_score_adj={self.oom_score_adj} cgroup_id={self.cgroup_id}")


def decode_oom(data: bytes) -> OomEvent:
    (ts, total_vm, anon, file_, shmem, pgt, cgid, vpid, tpid, ttid, uid, adj, vcomm,
     tcomm) = OOM_EVENT.unpack_from(data)
    return OomEvent(ts + _MONO_TO_WALL, vpid, _cstr(vcomm), tpid, ttid, _cstr(tcomm),
                    total_vm, anon, file_, shmem, pgt, uid, adj, cgid)
