"""deeptrace_core.proccounters: exited processes folded out of a per-process map."""

import os
from collections import namedtuple
from types import SimpleNamespace as NS

from deeptrace_core.proccounters import OTHER, ProcessCounters

DEAD = 4_194_304 + 7   # above pid_max's ceiling: never a live process


Key = namedtuple("Key", "tgid comm label")   # hashable, like BCC's ctypes keys


def key(tgid, label):
    return Key(tgid, b"name\0\0\0", label)


def counters(max_retired=100):
    return ProcessCounters(b"m", lambda k: (k.tgid, "name", k.label),
                           lambda v: (v.n, v.bytes), 2, max_retired)


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
