"""The memory probe on the real kernel with real load: page faults and RSS growth of a
process that touches fresh pages (checked against the kernel's own rusage and statm), and
an OOM kill in a memory-limited cgroup reported with the victim's pid."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from conftest import require_bpf

pytestmark = pytest.mark.bpf

MIB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def mem():
    require_bpf()
    from deeptrace_core.bpf import kernel_defines
    from deeptrace_plugins.memory.probe import MemoryConfig, MemoryProbe

    probe = MemoryProbe(MemoryConfig(interval=3600, top_n=100000, page_alloc=True))
    probe.attach(kernel_defines(probe.kernel_fields))
    yield probe
    probe.detach()


def metric(points, name, pid, **attributes):
    found = [p for p in points if p.kind == "metric" and p.name == name
             and p.attributes.get("process.pid") == pid
             and all(p.attributes.get(k) == v for k, v in attributes.items())]
    assert len(found) == 1, (name, pid, attributes, found)
    return found[0].value


TOUCH = """
import json, mmap, resource, sys
def report():
    r = resource.getrusage(resource.RUSAGE_SELF)
    statm = open('/proc/self/statm').read().split()
    print(json.dumps({"faults": r.ru_minflt + r.ru_majflt, "minor": r.ru_minflt,
                      "major": r.ru_majflt, "rss": int(statm[1]) * PAGE}), flush=True)
PAGE = mmap.PAGESIZE
N = 64 << 20
m = mmap.mmap(-1, N, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m.madvise(mmap.MADV_NOHUGEPAGE)     # one fault per 4 KiB page, no huge pages
report()
sys.stdin.readline()
for i in range(0, N, PAGE):
    m[i] = 1
report()
sys.stdin.readline()
"""


def test_touching_fresh_pages_faults_and_grows_rss(mem):
    child = subprocess.Popen([sys.executable, "-c", TOUCH], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    pid = child.pid
    try:
        before = json.loads(child.stdout.readline())
        p0 = mem.poll(0)
        child.stdin.write("go\n")
        child.stdin.flush()
        after = json.loads(child.stdout.readline())
        time.sleep(0.05)                     # it is blocked in read(stdin) by now
        p1 = mem.poll(0)
    finally:
        child.kill()
        child.wait()
    pages = (64 * MIB) // PAGE
    user0 = metric(p0, "deeptrace.memory.page_faults", pid, **{"deeptrace.page_fault.mode": "user"})
    user1 = metric(p1, "deeptrace.memory.page_faults", pid, **{"deeptrace.page_fault.mode": "user"})
    kern1 = metric(p1, "deeptrace.memory.page_faults", pid, **{"deeptrace.page_fault.mode": "kernel"})
    minor1 = metric(p1, "process.paging.faults", pid, **{"process.paging.fault_type": "minor"})
    major1 = metric(p1, "process.paging.faults", pid, **{"process.paging.fault_type": "major"})
    rss0 = metric(p0, "process.memory.usage", pid)
    rss1 = metric(p1, "process.memory.usage", pid)
    anon1 = metric(p1, "deeptrace.memory.rss", pid, **{"deeptrace.memory.rss_type": "anon"})
    alloc0 = metric(p0, "deeptrace.memory.page_alloc", pid)
    alloc1 = metric(p1, "deeptrace.memory.page_alloc", pid)
    print(f"faults: user {user0} -> {user1} (+{user1 - user0}, {pages} pages), kernel {kern1}, "
          f"minor {minor1} major {major1}; rusage {after}; "
          f"rss {rss0 / MIB:.2f} -> {rss1 / MIB:.2f} MiB (statm {after['rss'] / MIB:.2f} MiB), "
          f"page allocations +{(alloc1 - alloc0) / MIB:.2f} MiB")
    # Every page written for the first time faults once in user mode (no huge pages).
    assert user1 - user0 >= pages
    # Since its fork the child took the same faults the kernel's rusage counts: every
    # fault exception (user or kernel mode) and every accounted minor/major fault. A few
    # faults may fall between the rusage read and the report's own write.
    assert abs((user1 + kern1) - after["faults"]) <= 0.005 * after["faults"] + 10
    assert abs((minor1 + major1) - after["faults"]) <= 0.005 * after["faults"] + 10
    # RSS grew by the 64 MiB it touched. rss_stat reports the kernel's per-CPU counter
    # reads, which lag the exact sum by at most a batch (32 pages) per CPU and counter.
    slack = 2 * 32 * PAGE * os.cpu_count()
    assert 64 * MIB - slack <= rss1 - rss0 <= 64 * MIB + 4 * MIB, (rss0, rss1)
    assert abs(rss1 - after["rss"]) <= 2 * slack, (rss1, after["rss"])
    assert anon1 >= 64 * MIB - slack
    # Each first write allocates one zeroed page in the child's own context (plus a few
    # page-table pages and what the interpreter allocates meanwhile).
    assert 64 * MIB <= alloc1 - alloc0 <= 64 * MIB + 4 * MIB, (alloc0, alloc1)


# -- OOM ------------------------------------------------------------------------------------

def memory_cgroup_root():
    """(version, path) of a hierarchy with the memory controller: v2 if available."""
    mounts = [line.split() for line in open("/proc/mounts")]
    for _dev, path, fstype, *_ in mounts:
        if fstype == "cgroup2":
            try:
                controllers = open(os.path.join(path, "cgroup.controllers")).read().split()
            except OSError:
                continue
            if "memory" in controllers:
                return 2, path
    for _dev, path, fstype, opts, *_ in mounts:
        if fstype == "cgroup" and "memory" in opts.split(","):
            return 1, path
    return None, None


class MemoryLimitedCgroup:
    def __init__(self, limit):
        self.version, root = memory_cgroup_root()
        if root is None:
            pytest.fail("no cgroup hierarchy with the memory controller")
        self.path = os.path.join(root, f"dt-oom-{uuid.uuid4().hex[:8]}")
        if self.version == 2:
            sub = os.path.join(root, "cgroup.subtree_control")
            if "memory" not in open(sub).read().split():
                with open(sub, "w") as f:
                    f.write("+memory")
        os.mkdir(self.path)
        if self.version == 2:
            self._write("memory.max", limit)
            if os.path.exists(os.path.join(self.path, "memory.swap.max")):
                self._write("memory.swap.max", 0)
        else:
            self._write("memory.limit_in_bytes", limit)
            if os.path.exists(os.path.join(self.path, "memory.memsw.limit_in_bytes")):
                self._write("memory.memsw.limit_in_bytes", limit)   # no swap either

    def _write(self, name, value):
        with open(os.path.join(self.path, name), "w") as f:
            f.write(str(value))

    def add(self, pid):
        self._write("cgroup.procs", pid)

    def remove(self):
        deadline = time.monotonic() + 5
        while True:
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:     # EBUSY until the killed task is fully gone
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


HOG = """
import mmap, sys
sys.stdin.readline()
N = 256 << 20
m = mmap.mmap(-1, N, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(0, N, mmap.PAGESIZE):
    m[i] = 1
print("survived", flush=True)
"""


def test_oom_kill_in_limited_cgroup_is_reported(mem):
    from deeptrace_plugins.memory.decoder import OomEvent

    limit = 32 * MIB
    mem.poll(0)
    kills_before = dict(mem.oom_kills)
    cg = MemoryLimitedCgroup(limit)
    child = None
    try:
        child = subprocess.Popen([sys.executable, "-c", HOG], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        comm = open(f"/proc/{child.pid}/comm").read().strip()
        cg.add(child.pid)
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.wait(20) == -signal.SIGKILL      # the OOM killer's signal
        records, deadline = [], time.monotonic() + 5
        while time.monotonic() < deadline and not any(
                r.kind == "oom" and r.victim_pid == child.pid for r in records):
            records += mem.poll(10)
            time.sleep(0.02)
        records += mem.poll(0)
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        cg.remove()
    ooms = [r for r in records if r.kind == "oom" and r.victim_pid == child.pid]
    assert len(ooms) == 1, records
    ev = ooms[0]
    print(ev.line())
    assert isinstance(ev, OomEvent) and ev.victim_comm == comm
    # The child itself hit the limit while faulting in its pages: it is the trigger too.
    assert ev.trigger_pid == ev.trigger_tid == child.pid and ev.trigger_comm == comm
    # It was killed holding at least half the limit in anonymous memory, and not more
    # than the limit plus what it had before it joined the cgroup (charged elsewhere).
    assert limit // 2 // 1024 <= ev.anon_rss_kb <= (limit + 16 * MIB) // 1024, ev
    assert ev.to_dict()["kind"] == "oom" and ev.to_dict()["victim_pid"] == child.pid
    assert f"victim={comm}({child.pid})" in ev.line()
    kills = [p for p in records if p.kind == "metric" and p.name == "deeptrace.memory.oom_kills"
             and p.attributes["process.executable.name"] == comm]
    assert kills and kills[-1].value == kills_before.get(comm, 0) + 1
    assert mem.stats()["ringbuf_full"] == 0
