"""Per-process counters of the system probes, and their bounded labels.

Two ways a probe keeps a process's figures in the kernel, one toolkit for both:

- The kernel marks an exited process (an ``exited`` map of exit times, cpu and memory):
  :func:`exits` says which are old enough to forget, :func:`forget` deletes them once
  their final figures went out.
- The map is keyed by process and more (disk, network): :class:`ProcessCounters` moves an
  exited process's figures out of the kernel map into a table here (``gc``), so
  cumulative sums never go down; beyond ``max_retired`` keys the least busy retired ones
  are folded into pid and name "other".

Labels are bounded: the top N processes get their own series, every other one is
``process.pid="other"``. :class:`Folder` keeps "other" monotonic when processes move in
and out of the top N (it accumulates their *increase* while unselected);
:func:`busiest` + :func:`labels` rank by cumulative totals and sum the rest into "other"
(nothing is lost from the totals, but "other" drops when a process joins the top N).
"""

from __future__ import annotations

import ctypes
import os

import attrs

from .bpf import tracepoint_has_field

OTHER = "other"
OTHER_LABELS = (("process.pid", OTHER), ("process.executable.name", OTHER))
GRACE_NS = 500_000_000   # an exited process is forgotten once its exit is this old
# What process.bpf.h reads of the kernel (the agent passes their BTF offsets).
PROCESS_FIELDS = ("task_struct.group_leader", "task_struct.comm")


# -- processes --------------------------------------------------------------------------
def task_name(raw) -> str:
    """A kernel task name (char[16], NUL-padded) as text."""
    return bytes(raw).split(b"\0", 1)[0].decode("utf-8", "replace")


def pid_alive(pid: int) -> bool:
    """Pid 0 (no process known: the kernel's own work) never exits."""
    return pid == 0 or os.path.exists(f"/proc/{pid}")


def read_tgid(tid: int) -> int | None:
    """The process (thread group) of a thread id, from /proc; None if it is gone."""
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


# -- kernel maps ------------------------------------------------------------------------
def delete(table, key):
    """Delete a map entry that the kernel may have removed already."""
    try:
        del table[key]
    except KeyError:
        pass


def process_defines() -> dict:
    """The macros process.bpf.h needs besides the offsets of PROCESS_FIELDS."""
    return {"HAVE_GROUP_DEAD": int(tracepoint_has_field("sched", "sched_process_exit",
                                                        "group_dead"))}


def exits(bpf_obj, now_mono_ns: int) -> tuple:
    """(tgid -> exit time, the tgids whose exit is older than GRACE_NS) from the probe's
    ``exited`` map: their final figures go out once more, then :func:`forget` them."""
    exited = {k.value: val.value for k, val in bpf_obj[b"exited"].items()}
    return exited, {t for t, ts in exited.items() if now_mono_ns - ts > GRACE_NS}


def forget(bpf_obj, tgid: int, tables=(b"procs", b"exited")):
    """Delete an exited process from the maps keyed by its tgid."""
    key = ctypes.c_uint32(tgid)
    for name in tables:
        delete(bpf_obj[name], key)


def accumulate(into: dict, key, values):
    """Add `values` element-wise into ``into[key]`` (created as zeros)."""
    acc = into.get(key)
    if acc is None:
        into[key] = list(values)
        return
    for i, x in enumerate(values):
        acc[i] += x


@attrs.define
class ProcessCounters:
    """One map: ``key(k)`` gives (pid, name, *labels) of a kernel key (which has a
    ``tgid``), ``values(v)`` the counters of a kernel value."""

    map_name: bytes
    key: object
    values: object
    max_retired: int
    retired: dict = attrs.field(factory=dict)

    def read(self, bpf_obj) -> dict:
        """(pid, name, *labels) -> [counters], retired processes included."""
        out = {k: list(v) for k, v in self.retired.items()}
        for k, val in bpf_obj[self.map_name].items():
            accumulate(out, self.key(k), self.values(val))
        return out

    def gc(self, bpf_obj):
        """Fold exited processes out of the kernel map."""
        table = bpf_obj[self.map_name]
        for k, val in list(table.items()):
            if not pid_alive(k.tgid):
                accumulate(self.retired, self.key(k), self.values(val))
                delete(table, k)
        if len(self.retired) > self.max_retired:
            ranked = sorted(self.retired, key=self.retired.__getitem__, reverse=True)
            for k in ranked[self.max_retired // 2:]:
                accumulate(self.retired, (OTHER, OTHER, *k[2:]), self.retired.pop(k))


# -- top N ------------------------------------------------------------------------------
def select(n: int, *rankings) -> set:
    """Up to n keys, taken in turn from each ranking (iterables, best first)."""
    chosen: set = set()
    iters = [iter(r) for r in rankings]
    while len(chosen) < n and iters:
        for it in list(iters):
            for key in it:
                if key not in chosen:
                    chosen.add(key)
                    break
            else:
                iters.remove(it)
            if len(chosen) >= n:
                break
    return chosen


def busiest(n: int, loads: dict) -> set:
    """The n (pid, name) keys of `loads` with the highest load (compared as sequences:
    e.g. bytes, then operations)."""
    return set(sorted(loads, key=loads.__getitem__, reverse=True)[:n])


def labels(pid, name, top: set) -> tuple:
    """The process attributes of a series, as (key, value) pairs: its own in the top N,
    else "other"."""
    if (pid, name) in top:
        return (("process.pid", pid), ("process.executable.name", name))
    return OTHER_LABELS


@attrs.define
class Folder:
    """Per-process cumulative vectors (lists of numbers) -> selected series + "other".

    Cumulative sums stay monotonic per series: "other" accumulates the increase of each
    process while it is not selected, so a process moving between "other" and its own
    series never makes a series go down (its earlier increase stays counted in "other").
    """

    width: int
    last: dict = attrs.field(factory=dict)      # key -> vector as of the previous fold
    other: list = attrs.field(default=attrs.Factory(lambda s: [0] * s.width, takes_self=True))

    def delta(self, key, vec) -> list:
        prev = self.last.get(key)
        if prev is None:
            return list(vec)
        return [max(0, a - b) for a, b in zip(vec, prev)]

    def fold(self, current: dict, selected: set, gone=()) -> list:
        """Fold unselected processes' increase into "other"; returns "other" (cumulative).
        `gone`: keys whose figures are final (the process exited): forgotten afterwards."""
        for key, vec in current.items():
            if key not in selected:
                self.other = [o + d for o, d in zip(self.other, self.delta(key, vec))]
            self.last[key] = list(vec)
        for key in set(self.last) - set(current) | set(gone):
            self.last.pop(key, None)
        return list(self.other)

