"""Per-process counters that a probe keeps in a BPF hash map, exited processes included.

A map keyed by process would fill with the dead: ``gc`` moves an exited process's
figures out of the kernel map into a table here, and ``read`` gives those plus the live
ones, so cumulative sums never go down. Beyond ``max_retired`` keys the least busy
retired ones are folded into pid and name "other" (outside the top N processes they would
be labelled so anyway).
"""

import os

OTHER = "other"


def task_name(raw) -> str:
    """A kernel task name (char[16], NUL-padded) as text."""
    return bytes(raw).split(b"\0", 1)[0].decode("utf-8", "replace")


def pid_alive(pid: int) -> bool:
    """Pid 0 (no process known: the kernel's own work) never exits."""
    return pid == 0 or os.path.exists(f"/proc/{pid}")


def delete(table, key):
    """Delete a map entry that the kernel may have removed already."""
    try:
        del table[key]
    except KeyError:
        pass


class ProcessCounters:
    """One map: ``key(k)`` gives (pid, name, *labels) of a kernel key (which has a
    ``tgid``), ``values(v)`` the tuple of ``width`` counters of a kernel value."""

    def __init__(self, map_name: bytes, key, values, width: int, max_retired: int):
        self.map_name = map_name
        self.key = key
        self.values = values
        self.width = width
        self.max_retired = max_retired
        self.retired: dict = {}

    def _sum_into(self, into: dict, key, values):
        acc = into.setdefault(key, [0] * self.width)
        for i, x in enumerate(values):
            acc[i] += x

    def _add(self, into: dict, k, val):
        self._sum_into(into, self.key(k), self.values(val))

    def read(self, bpf_obj) -> dict:
        """(pid, name, *labels) -> [counters], retired processes included."""
        out = {k: list(v) for k, v in self.retired.items()}
        for k, val in bpf_obj[self.map_name].items():
            self._add(out, k, val)
        return out

    def gc(self, bpf_obj):
        """Fold exited processes out of the kernel map."""
        table = bpf_obj[self.map_name]
        for k, val in list(table.items()):
            if not pid_alive(k.tgid):
                self._add(self.retired, k, val)
                delete(table, k)
        if len(self.retired) > self.max_retired:
            ranked = sorted(self.retired, key=self.retired.__getitem__, reverse=True)
            for k in ranked[self.max_retired // 2:]:
                self._sum_into(self.retired, (OTHER, OTHER, *k[2:]), self.retired.pop(k))
