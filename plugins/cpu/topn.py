"""Bounded label cardinality for per-process metrics: the top N processes get their own
series, every other process is folded into one ``process.pid="other"`` series.

Cumulative sums stay monotonic per series: "other" accumulates the *increase* of each
process while it is not selected, so a process moving between "other" and its own series
never makes any series go down (its earlier increase stays counted in "other").
"""

from __future__ import annotations

import os

OTHER = "other"


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


def ranked(values: dict, score) -> list:
    """Keys of `values` by descending score(value), ties by key (stable output)."""
    return [k for k, _ in sorted(values.items(), key=lambda kv: (-score(kv[1]), kv[0]))]


class Folder:
    """Per-process cumulative vectors (lists of numbers) -> selected series + "other"."""

    def __init__(self, width: int):
        self.width = width
        self.last: dict = {}            # key -> vector as of the previous fold
        self.other = [0] * width

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


def proc_alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")
