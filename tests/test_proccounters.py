"""deeptrace_core.proccounters, the system probes' per-process toolkit: exited processes
folded out of a per-process map, the top-N labels ("other") both ways, and the C it
shares (process.bpf.h and the others, inlined by bpf.read_source)."""

import os
from collections import namedtuple
from types import SimpleNamespace as NS

import pytest

from deeptrace_core import bpf, bpfgroup
from deeptrace_core.proccounters import (OTHER, OTHER_LABELS, Folder, ProcessCounters,
                                         accumulate, busiest, labels, pid_alive, read_tgid,
                                         select, task_name)

DEAD = 4_194_304 + 7   # above pid_max's ceiling: never a live process


Key = namedtuple("Key", "tgid comm label")   # hashable, like BCC's ctypes keys


def key(tgid, label):
    return Key(tgid, b"name\0\0\0", label)


def counters(max_retired=100):
    return ProcessCounters(b"m", lambda k: (k.tgid, task_name(k.comm), k.label),
                           lambda v: (v.n, v.bytes), max_retired)


def test_read_gives_retired_plus_live_and_gc_empties_the_map_of_the_dead():
    live, dead = key(os.getpid(), "a"), key(DEAD, "a")
    table = {live: NS(n=1, bytes=10), dead: NS(n=2, bytes=20)}
    c = counters()
    c.gc({b"m": table})
    assert list(table) == [live]                     # the exited process left the map
    table[key(DEAD, "a")] = NS(n=5, bytes=50)        # the kernel re-created the key
    assert c.read({b"m": table}) == {(os.getpid(), "name", "a"): [1, 10],
                                     (DEAD, "name", "a"): [7, 70]}   # never goes down


def test_retired_beyond_the_bound_fold_into_other_keeping_the_sums():
    table = {key(DEAD + i, "x"): NS(n=i + 1, bytes=1) for i in range(10)}
    c = counters(max_retired=4)
    c.gc({b"m": table})
    got = c.read({b"m": {}})
    assert len(got) == 3                             # the 2 busiest + "other"
    assert got[(OTHER, OTHER, "x")] == [sum(range(1, 9)), 8]
    assert sum(v[0] for v in got.values()) == sum(range(1, 11))


def test_accumulate_copies_and_adds():
    src = [1, 2]
    into = {}
    accumulate(into, "k", src)
    accumulate(into, "k", (10, 20))
    assert into == {"k": [11, 22]} and src == [1, 2]   # the first values are not aliased


def test_busiest_and_labels_fold_the_rest_into_other():
    loads = {(1, "a"): [10, 1], (2, "b"): [10, 5], (3, "c"): [1, 100]}
    top = busiest(2, loads)
    assert top == {(1, "a"), (2, "b")}               # bytes first, then operations
    assert labels(2, "b", top) == (("process.pid", 2), ("process.executable.name", "b"))
    assert labels(3, "c", top) == OTHER_LABELS
    assert labels(2, "renamed", top) == OTHER_LABELS  # a process is (pid, name)


def test_select_interleaves_rankings():
    assert select(3, [1, 2, 3, 4], [9, 1, 8]) == {1, 9, 2}
    assert select(10, [1, 2], [2, 3]) == {1, 2, 3}
    assert select(0, [1]) == set()


def test_folder_keeps_every_series_monotonic():
    f = Folder(2)
    # t1: a selected, b folded into other.
    assert f.fold({1: [10, 1], 2: [5, 1]}, {1}) == [5, 1]
    # t2: b overtakes a and is selected: its own series starts at its total (7); the 5
    # it had while in "other" stays there, so "other" does not go down.
    assert f.fold({1: [12, 1], 2: [7, 2]}, {2}) == [7, 1]
    # t3: b exits (gone): final figures once, then forgotten; a stays in "other".
    assert f.fold({1: [20, 1], 2: [9, 2]}, {2}, gone={2}) == [15, 1]
    assert 2 not in f.last
    # A new process reusing pid 2, unselected: its whole total goes to "other".
    assert f.fold({1: [20, 1], 2: [3, 0]}, {1}) == [18, 1]


def test_processes_from_proc():
    assert task_name(b"bash\0junk\0\0") == "bash"
    assert pid_alive(0) and pid_alive(os.getpid()) and not pid_alive(DEAD)
    assert read_tgid(os.getpid()) == os.getpid()
    assert read_tgid(DEAD) is None


@pytest.mark.parametrize("package,filename,shared", [
    ("deeptrace_plugins.cpu", "cpu.bpf.c", ("stats", "process")),
    ("deeptrace_plugins.memory", "memory.bpf.c", ("stats", "process")),
    ("deeptrace_plugins.disk", "disk.bpf.c", ("stats", "log2hist")),
    ("deeptrace_plugins.network", "network.bpf.c", ("stats", "log2hist")),
])
def test_shared_c_is_inlined_and_prefixed_per_probe(package, filename, shared):
    text = bpf.read_source(package, filename)
    assert "#include \"deeptrace_core/" not in text   # all BCC compiles is in the text
    for name in shared:
        assert f"// {name}.bpf.h\n" in text
    names = bpfgroup.global_names(text)
    assert {"stats", "stat_inc"} <= names               # the group compile prefixes them
    if "process" in shared:
        assert {"proc_entry", "leader_comm", "current_tgid"} <= names
        assert text.count("TRACEPOINT_PROBE(sched, sched_process_exit)") == 1
    assert not bpfgroup.clashes(text)


def test_tracepoint_has_field_reads_the_format_file():
    if not os.path.isdir(f"{bpf.TRACEFS[0]}/events/sched"):
        pytest.skip("tracefs not mounted")
    assert bpf.tracepoint_has_field("sched", "sched_switch", "prev_pid")
    assert not bpf.tracepoint_has_field("sched", "sched_switch", "no_such_field")
    assert not bpf.tracepoint_has_field("sched", "no_such_event", "prev_pid")
