"""Host probe: procfs parsing (exact, on a synthetic procfs) and real counters that move
by at least what this test does to the machine (CPU, disk, loopback traffic)."""

import os
import socket
import subprocess
import sys
import threading
import time

from conftest import block_device_file, synced_write
from deeptrace_plugins.host.probe import HostConfig, HostProbe
from deeptrace_plugins.host.plugin import deeptrace_register_probes


def probe(**kw):
    p = HostProbe(HostConfig(**kw))
    p.attach({})
    return p


def _key(k):
    return k.replace("_", ".").replace("logical.number", "logical_number")


def val(points, name, **attrs):
    found = [p.value for p in points if p.name == name
             and all(p.attributes.get(_key(k)) == v for k, v in attrs.items())]
    assert len(found) == 1, (name, attrs, found)
    return found[0]


FAKE = {
    "stat": """cpu  300 20 100 5000 10 1 2 3 0 0
cpu0 100 10 50 2500 5 1 1 1 7 0
cpu1 200 10 50 2500 5 0 1 2 0 0
intr 1 2 3
btime 1700000000
""",
    "meminfo": """MemTotal:       16000 kB
MemFree:         4000 kB
MemAvailable:    9000 kB
Buffers:         1000 kB
Cached:          3000 kB
SReclaimable:     500 kB
SwapTotal:       2048 kB
SwapFree:        1024 kB
HugePages_Total:    0
""",
    "diskstats": """ 254       0 vda 10 2 80 7 20 3 160 9 0 12 16 0 0 0 0 0 0
   7       0 loop0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0
 254       1 vda1 4 0 8 1 5 0 40 2 0 3 3
""",
    "net/dev": """Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:  1000      10    1    2    0     0          0         0     2000      20    3    4    0     0       0          0
  eth0: 5 1 0 0 0 0 0 0 6 2 0 0 0 0 0 0
""",
    "loadavg": "0.50 0.25 0.10 1/100 1234\n",
}


def test_parses_a_synthetic_procfs_exactly(tmp_path):
    for name, text in FAKE.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    p = probe(procfs=str(tmp_path))
    pts = p.poll(0)
    hz = os.sysconf("SC_CLK_TCK")
    assert val(pts, "system.cpu.time", cpu_logical_number=0, cpu_mode="user") == 100 / hz
    assert val(pts, "system.cpu.time", cpu_logical_number=1, cpu_mode="steal") == 2 / hz
    assert val(pts, "system.cpu.time", cpu_logical_number=0, cpu_mode="interrupt") == 1 / hz
    assert len([x for x in pts if x.name == "system.cpu.time"]) == 2 * 8   # no "cpu " total
    assert val(pts, "system.cpu.logical.count") == 2
    kib = 1024
    assert val(pts, "system.memory.usage", system_memory_state="free") == 4000 * kib
    assert val(pts, "system.memory.usage", system_memory_state="buffers") == 1000 * kib
    assert val(pts, "system.memory.usage", system_memory_state="cached") == 3500 * kib
    assert val(pts, "system.memory.usage", system_memory_state="used") == 7500 * kib
    assert val(pts, "system.memory.limit") == 16000 * kib
    assert val(pts, "system.paging.usage", system_paging_state="used") == 1024 * kib
    assert val(pts, "system.disk.io", system_device="vda", disk_io_direction="read") == 80 * 512
    assert val(pts, "system.disk.io", system_device="vda", disk_io_direction="write") == 160 * 512
    assert val(pts, "system.disk.operations", system_device="vda",
               disk_io_direction="write") == 20
    assert val(pts, "system.disk.merged", system_device="vda", disk_io_direction="read") == 2
    assert val(pts, "system.disk.operation_time", system_device="vda",
               disk_io_direction="read") == 0.007
    assert val(pts, "system.disk.io_time", system_device="vda") == 0.012
    assert val(pts, "system.disk.io", system_device="vda1", disk_io_direction="write") == 40 * 512
    assert not any(x.attributes.get("system.device") == "loop0" for x in pts)  # never used
    lo = {"network_interface_name": "lo"}
    assert val(pts, "system.network.io", network_io_direction="receive", **lo) == 1000
    assert val(pts, "system.network.io", network_io_direction="transmit", **lo) == 2000
    assert val(pts, "system.network.packets", network_io_direction="transmit", **lo) == 20
    assert val(pts, "system.network.errors", network_io_direction="receive", **lo) == 1
    assert val(pts, "system.network.dropped", network_io_direction="transmit", **lo) == 4
    assert val(pts, "system.cpu.load_average.1m") == 0.5
    assert val(pts, "system.cpu.load_average.15m") == 0.1
    sums = [x for x in pts if x.type == "sum"]
    assert sums and all(x.start_ns == 1700000000 * 10**9 for x in sums)   # since boot
    assert p.stats() == {"collections": 1, "read_errors": 0}


def test_contract_and_interval_without_blocking():
    p = HostProbe(HostConfig(interval=0.3))
    assert p.kernel_fields == () and p.render({"X": 1}) == ""
    assert p.poll(0) == []                     # not attached: nothing
    p.attach({"OFF_x": 1})
    first = p.poll(100)
    assert first and all(x.kind == "metric" for x in first)
    t0 = time.monotonic()
    assert p.poll(100) == []                   # interval not elapsed: [] at once
    assert time.monotonic() - t0 < 0.02
    time.sleep(0.35)
    assert p.poll(100)                         # the interval has elapsed
    assert p.poll(0)                           # the final drain: points at once, always
    assert p.poll(0)
    p.detach()
    assert p.poll(0) == []

    class Reg:
        def add_probe(self, cls):
            self.cls = cls
    reg = Reg()
    deeptrace_register_probes(reg)
    assert reg.cls is HostProbe and reg.cls.name == "host"


def test_real_memory_and_cpu():
    p = probe()
    mi = {}
    for line in open("/proc/meminfo"):
        k, _, rest = line.partition(":")
        mi[k] = int(rest.split()[0]) * 1024
    pts = p.poll(0)
    states = {s: val(pts, "system.memory.usage", system_memory_state=s)
              for s in ("used", "free", "cached", "buffers")}
    assert sum(states.values()) == val(pts, "system.memory.limit") == mi["MemTotal"]
    assert all(v >= 0 for v in states.values()) and states["used"] > 0
    ncpu = val(pts, "system.cpu.logical.count")
    assert ncpu == os.cpu_count()

    def cpu(points, busy):
        idle = ("idle", "iowait")
        return sum(x.value for x in points if x.name == "system.cpu.time"
                   and (x.attributes["cpu.mode"] not in idle) == busy)
    t0 = time.monotonic()
    before = p.collect()
    # A child that burns 0.4 s of CPU.
    child = subprocess.Popen([sys.executable, "-c",
                              "import time\nt=time.process_time()\n"
                              "while time.process_time() - t < 0.4: pass"])
    _, _, ru = os.wait4(child.pid, 0)
    after = p.collect()
    wall = time.monotonic() - t0
    tick = 1 / os.sysconf("SC_CLK_TCK")
    burned = ru.ru_utime + ru.ru_stime
    # Busy time on all CPUs grew by at least what the child burned (less one tick per CPU
    # of accounting granularity); all time grew by about wall x CPUs.
    assert cpu(after, True) - cpu(before, True) >= burned - 2 * tick * ncpu
    total = cpu(after, True) + cpu(after, False) - cpu(before, True) - cpu(before, False)
    assert abs(total - wall * ncpu) <= 0.1 * wall * ncpu + 2 * tick * ncpu
    loads = [val(pts, f"system.cpu.load_average.{m}") for m in ("1m", "5m", "15m")]
    assert all(x >= 0 for x in loads)


def test_loopback_counters_grow_by_at_least_the_traffic():
    p = probe()
    n = 4 * 1024 * 1024
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    before = p.collect()

    def sink(s):
        got = 0
        while got < n:
            got += len(s.recv(1 << 20))
        s.sendall(b"k")
    c = socket.create_connection(srv.getsockname())
    s, _ = srv.accept()
    t = threading.Thread(target=sink, args=(s,))
    t.start()
    c.sendall(b"x" * n)
    assert c.recv(1) == b"k"
    t.join()
    for x in (c, s, srv):
        x.close()
    after = p.collect()
    lo = {"network_interface_name": "lo"}
    for d in ("receive", "transmit"):
        grew = (val(after, "system.network.io", network_io_direction=d, **lo)
                - val(before, "system.network.io", network_io_direction=d, **lo))
        # On lo every byte sent is also received; payload plus headers, so >= n.
        assert grew >= n
        pk = (val(after, "system.network.packets", network_io_direction=d, **lo)
              - val(before, "system.network.packets", network_io_direction=d, **lo))
        assert pk >= n // 65536                 # lo's MTU is 64 KiB


def test_disk_write_counters_grow_by_at_least_the_bytes():
    n = 8 * 1024 * 1024
    with block_device_file("host") as (path, dev):
        p = probe()
        before = p.collect()
        synced_write(path, n)
        after = p.collect()
    grew = (val(after, "system.disk.io", system_device=dev, disk_io_direction="write")
            - val(before, "system.disk.io", system_device=dev, disk_io_direction="write"))
    assert grew >= n
    ops = (val(after, "system.disk.operations", system_device=dev, disk_io_direction="write")
           - val(before, "system.disk.operations", system_device=dev, disk_io_direction="write"))
    max_kb = int(open(f"/sys/block/{dev}/queue/max_sectors_kb").read())
    assert ops >= n // (max_kb * 1024)           # no request is larger than max_sectors_kb
    assert (val(after, "system.disk.io_time", system_device=dev)
            >= val(before, "system.disk.io_time", system_device=dev))
