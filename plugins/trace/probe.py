"""The trace probe: socket system calls of the selected processes, one record per call."""

import ctypes
import fcntl
import logging
import os
import time

import attrs
from attrs import validators as v

from deeptrace_core import bpf, btf
from deeptrace_core.l7 import check_protocols
from deeptrace_core.metricprobe import power_of_two
from deeptrace_core.ringbuf import RingBuffer

from .asyncio import AsyncioTracer
from .decoder import LOSS_STATS, STAT_NAMES, make_decoder
from .fields import KERNEL_FIELDS
from .goroutine import PROGRAMS as GO_PROGRAMS
from .goroutine import GoTracker

log = logging.getLogger("deeptrace.trace")


# The most payload a call can keep: the per-CPU scratch record holds twice the cap (for
# the verifier's bounds) and a per-CPU map value is at most 32 KiB.
MAX_PAYLOAD = 8192
# Records decoded per poll: what a round holds in memory stays bounded whatever the ring's
# size (a full 16 MB ring is ~60,000 records); the next round takes the rest at once.
BATCH_RECORDS = 4096
# Go spawn edges and execs (32-byte events) between two polls: 256 KiB holds ~6,500.
GO_RING_PAGES = 64
# Every process is looked at again this often, for Go programs whose exec event was lost
# (go_events full): a look is a stat for each process, executables are read once.
GO_RESCAN_S = 30.0


def _payload_sizes(inst, attribute, value):
    for name, size in value.items():
        if name not in inst.protocols:
            raise ValueError(f"{name!r} is not detected in the kernel (allowed: the "
                             f"protocols listed in `protocols`: "
                             f"{', '.join(inst.protocols) or 'none'})")
        if not 0 <= size <= MAX_PAYLOAD:
            raise ValueError(f"{name}: {size} is not within 0..{MAX_PAYLOAD} bytes")


def _record_budgets(inst, attribute, value):
    for name, n in value.items():
        if name not in inst.protocols:
            raise ValueError(f"{name!r} is not detected in the kernel (allowed: the "
                             f"protocols listed in `protocols`: "
                             f"{', '.join(inst.protocols) or 'none'})")
        if not 1 <= n <= 250:
            raise ValueError(f"{name}: {n} is not within 1..250 records")


@attrs.define
class TraceConfig:
    """``probes.trace`` in the YAML config."""

    pids: list[int] = attrs.field(factory=list)       # trace these processes (tgid) ...
    comms: list[str] = attrs.field(factory=list)      # ... and processes with these names
    exclude_comms: list[str] = attrs.field(factory=list)  # never these (e.g. sshd: no feedback)
    ports: list[int] = attrs.field(factory=list)      # only sockets with one of these ports
    # Confine the agent to these network namespaces (names as `ip netns` lists them, or
    # nsfs paths such as /proc/PID/ns/net) and/or these cgroup v2 directories (absolute,
    # or relative to the v2 mount; their descendants too): nothing outside is traced.
    netns: list[str] = attrs.field(factory=list, validator=lambda i, a, val: netns_inodes(val))
    cgroups: list[str] = attrs.field(factory=list, validator=lambda i, a, val: cgroup_ids(val))
    payload_bytes: int = attrs.field(default=1024, validator=[v.ge(0), v.le(MAX_PAYLOAD)])
    # 16 MB: ~1 s of HTTP/1 at 30,000 requests/s, so a nice-10 agent that the traced
    # services keep off the CPU for a moment catches up instead of losing records.
    ringbuf_pages: int = attrs.field(default=4096, validator=power_of_two)
    # Wake the agent early once a CPU wrote this much; 0: default_wakeup_bytes().
    wakeup_bytes: int = attrs.field(default=0, validator=[v.ge(0), v.le(1 << 30)])
    poll_ms: int = attrs.field(default=100, validator=[v.ge(1), v.le(10000)])
    max_connections: int = attrs.field(default=65536, validator=[v.ge(16), v.le(1 << 22)])
    # L7 protocols to detect in the kernel; when set, only their connections are sent.
    # Names are checked against the registry when the file is loaded (config.py).
    protocols: list[str] = attrs.field(factory=list, metadata={"registered": "protocols"})
    # Bytes kept per call on a connection of a detected protocol, instead of payload_bytes:
    # less for protocols whose bodies say nothing (http1: 512), more where frames that
    # matter follow large ones (http2: 4096; else they fall in uncaptured holes).
    protocol_payload_bytes: dict[str, int] = attrs.field(factory=dict, validator=_payload_sizes)
    # Records sent per connection of a detected protocol, at most; then it is dropped in
    # the kernel like an undetected one (tls: its hellos say what there is to say, the
    # rest is ciphertext).
    protocol_max_records: dict[str, int] = attrs.field(factory=dict, validator=_record_budgets)
    l7_max_tries: int = attrs.field(default=4, validator=[v.ge(1), v.le(250)])
    # Go programs: the goroutine on every record, and http.Client's and `go` statements'
    # hand-offs (goroutine.py); off, Go calls are linked by thread like any other.
    go: bool = True
    # asyncio: uprobes on CPython's _asyncio extension put the running Task on each record
    # (asyncio.py); files first mapped after start-up are found at the next rescan.
    asyncio: bool = True
    # Event-loop iterations: epoll_wait/epoll_pwait/epoll_pwait2 returns counted per thread
    # (loop_iter on each record, deeptrace.loop_iter on spans). Off by default: no linking
    # rule needs it, and every epoll return on the host would run a program (`make bench`,
    # runtimes: +180 ns a return; a Go program's netpoller, +26 ns a data call).
    loop_counter: bool = False
    # Slots of the loop counter's table (two threads each, 24 bytes): a thread whose id's
    # low bits match two others' takes a way (loop_slots_taken); more slots, fewer of those.
    loop_slots: int = attrs.field(default=65536, validator=power_of_two)
    asyncio_rescan: float = attrs.field(default=10.0, validator=[v.ge(0), v.le(86400)],
                                        metadata={"unit": "seconds"})


PAGE = os.sysconf("SC_PAGE_SIZE")
NETNS_DIR = "/var/run/netns"
NS_GET_NSTYPE, CLONE_NEWNET = 0xB703, 0x40000000     # linux/nsfs.h, linux/sched.h


def netns_inodes(names) -> dict:
    """{name: namespace inode} of `ip netns` names or nsfs paths; ValueError if one is
    not a network namespace."""
    out = {}
    for name in names:
        path = name if name.startswith("/") else os.path.join(NETNS_DIR, name)
        try:
            st = os.stat(path)
            with open(path) as f:   # an nsfs file (ip netns bind-mounts one per name)
                try:
                    kind = fcntl.ioctl(f.fileno(), NS_GET_NSTYPE)
                except OSError:
                    kind = None
            if kind != CLONE_NEWNET:
                raise OSError("not a network namespace")
        except OSError as e:
            known = sorted(os.listdir(NETNS_DIR)) if os.path.isdir(NETNS_DIR) else []
            raise ValueError(f"netns {name!r}: {e.strerror or e} (ip netns lists: "
                             f"{', '.join(known) or 'none'})") from None
        out[name] = st.st_ino
    return out


def cgroup2_root() -> str | None:
    """Where the cgroup v2 hierarchy is mounted: /sys/fs/cgroup, or /sys/fs/cgroup/unified
    on a hybrid (v1 + v2) host. The kernel's cgroup ids are those of this hierarchy."""
    try:
        with open("/proc/self/mounts") as f:
            mounts = [line.split()[1] for line in f if line.split()[2:3] == ["cgroup2"]]
    except OSError:
        return None
    return min(mounts, key=len) if mounts else None


def cgroup_ids(paths) -> dict:
    """{path: (cgroup id, level)} of cgroup v2 directories (absolute, or relative to the
    v2 mount); ValueError if one is not."""
    out = {}
    root = cgroup2_root() if paths else None
    if paths and root is None:
        raise ValueError("cgroups: no cgroup v2 hierarchy is mounted")
    for p in paths:
        full = os.path.normpath(p if p.startswith(root + "/")
                                else os.path.join(root, p.lstrip("/")))
        rel = os.path.relpath(full, root)
        if rel == "." or rel.startswith(".."):
            raise ValueError(f"cgroups: {p!r} is not a cgroup below {root}")
        if not os.path.exists(os.path.join(full, "cgroup.procs")):
            raise ValueError(f"cgroups: {p!r}: no cgroup at {full}")
        out[p] = (os.stat(full).st_ino, rel.count("/") + 1)
    return out


def default_wakeup_bytes(ring_bytes: int, cpus: int | None = None) -> int:
    """A quarter of the ring shared among the CPUs: each CPU wakes the agent once it wrote
    its share, so at most a quarter of the ring waits unannounced however many CPUs write
    (a fixed fraction per CPU let 16 CPUs fill the ring before any woke it)."""
    return max(64, ring_bytes // (4 * (cpus or os.cpu_count() or 1)))


def _pow2_at_least(n: int) -> int:
    p = 32  # L7 detectors may read 64 bytes (2 * PAYLOAD_MAX) of the payload buffer
    while p < n:
        p <<= 1
    return p


class TraceProbe:
    name = "trace"
    loss_counters = (*LOSS_STATS, "decode_failed")
    config_class = TraceConfig
    kernel_fields = KERNEL_FIELDS
    batch_limit = BATCH_RECORDS  # the most records a poll returns (the agent's final drain)
    source = ("deeptrace_plugins.trace", "trace.bpf.c")

    def __init__(self, config: TraceConfig, context=None):
        self.config = config
        self.context = context
        self.bpf = None
        self.ring = None
        self._generation = 0  # of the filters, as the kernel's `armed` holds it; 0: not armed
        self.self_pid = os.getpid()
        self.protocols = self._protocol_classes()
        self.protocol_names = tuple(cls.name for cls in self.protocols)
        self.go = GoTracker(self_pid=self.self_pid) if config.go else None
        self._go_next_full = time.monotonic() + GO_RESCAN_S
        self.asyncio = AsyncioTracer(config.asyncio_rescan, self.self_pid) \
            if config.asyncio else None

    def _protocol_classes(self):
        names = self.config.protocols
        if not names:
            return []
        registry = getattr(self.context, "registry", None)
        known = registry.protocols if registry is not None else {}
        check_protocols(names, known)
        if len(names) > 250:
            raise ValueError("protocols: at most 250")
        return [known[n].cls for n in names]

    # -- build --------------------------------------------------------------------------
    def defines(self) -> dict:
        c = self.config
        skc = btf.kernel_offsets([f for f in KERNEL_FIELDS if f.startswith("sock_common.")])
        caps = {i: c.protocol_payload_bytes[cls.name]
                for i, cls in enumerate(self.protocols, 1) if cls.name in c.protocol_payload_bytes}
        defines = {
            "PAYLOAD_MAX": _pow2_at_least(max(c.payload_bytes, *caps.values(), 1)),
            "PAYLOAD_CAP": c.payload_bytes,
            "MAX_IOV": 64,        # gRPC and nginx write many small slices at once
            "MMSG_MAX_IOV": 8,
            "MAX_MMSG": 8,
            "CONN_MAX": c.max_connections,
            "RINGBUF_PAGES": c.ringbuf_pages,
            "WAKEUP_BYTES": c.wakeup_bytes or default_wakeup_bytes(c.ringbuf_pages * PAGE),
            "SELF_TGID": self.self_pid,
            "FILTER_PIDS": int(bool(c.pids)),
            "FILTER_COMMS": int(bool(c.comms)),
            "FILTER_EXCLUDE_COMMS": int(bool(c.exclude_comms)),
            "FILTER_PORTS": int(bool(c.ports)),
            "FILTER_NETNS": int(bool(c.netns)),
            "FILTER_CGROUPS": int(bool(c.cgroups)),
            "CGROUP_MAX_LEVEL": max((lv for _, lv in cgroup_ids(c.cgroups).values()), default=1),
            "SKC_CHUNK": max(m.offset + m.size for m in skc.values()),
            "L7_ENABLED": int(bool(self.protocols)),
            "L7_COUNT": max(1, len(self.protocols)),
            "L7_MAX_TRIES": c.l7_max_tries,
            "GO_ENABLED": int(c.go),
            "GO_PROCS_MAX": 16384,     # Go processes
            "GO_MAX": 65536,           # connections' loop goroutines, calls in roundTrip
            "GO_RING_PAGES": GO_RING_PAGES,
            "HAVE_EPOLL_PWAIT2": int(bpf.tracepoint_exists("syscalls", "sys_exit_epoll_pwait2")),
            "ASYNCIO_ENABLED": int(c.asyncio),
            "LOOP_COUNTER_ENABLED": int(c.loop_counter),
            "LOOP_SLOTS": c.loop_slots,
        }
        if caps:  # protocol i (slot order) -> its cap, in payload_cap()
            defines["PROTO_CAP_CASES"] = " ".join(f"case {i}: return {n};"
                                                  for i, n in sorted(caps.items()))
        budgets = {i: c.protocol_max_records[cls.name] for i, cls in enumerate(self.protocols, 1)
                   if cls.name in c.protocol_max_records}
        if budgets:  # protocol i (slot order) -> its record budget, in proto_records()
            defines["PROTO_RECORDS_CASES"] = " ".join(f"case {i}: return {n};"
                                                      for i, n in sorted(budgets.items()))
        return defines

    def l7_source(self) -> tuple[str, str]:
        """The enabled protocols' kernel detectors (before trace.bpf.c) and one program per
        protocol that runs its detector (after it: they use its maps and helpers)."""
        if not self.protocols:
            return "", ""
        detectors = "\n".join(bpf.read_source(*cls.detect_c) for cls in self.protocols)
        programs = "".join(
            f"int l7_try_{i}(void *ctx) {{\n"
            "    struct event_t *e;\n    struct conn_val_t *c;\n"
            "    if (!l7_record(&e, &c))\n        return 0;\n"
            f"    int r = detect_{cls.name}(e->payload, e->payload_len, e->lport, e->rport, "
            "e->l4);\n"
            f"    return l7_step(ctx, e, c, r, {i});\n}}\n"
            for i, cls in enumerate(self.protocols, 1))
        return detectors, programs

    def render(self, defines: dict) -> str:
        before, after = self.l7_source()
        source = before + "\n" + bpf.read_source(*self.source) + "\n" + after
        return bpf.render(source, {**defines, **self.defines()})

    # -- run ----------------------------------------------------------------------------
    def attach(self, defines: dict):
        self.bpf = bpf.load(self.render(defines))
        from bcc import BPF
        # The syscall exits tail-call these shared bodies (slots as in trace.bpf.c).
        for slot, name in enumerate((b"data_exit", b"mmsg_exit", b"ctl_exit", b"mmsg_msg")):
            fn = self.bpf.load_func(name, BPF.TRACEPOINT)
            self.bpf[b"exit_progs"][ctypes.c_int(slot)] = ctypes.c_int(fn.fd)
        for slot in range(len(self.protocols)):  # the detector chain, protocol i in slot i-1
            fn = self.bpf.load_func(f"l7_try_{slot + 1}".encode(), BPF.TRACEPOINT)
            self.bpf[b"l7_progs"][ctypes.c_int(slot)] = ctypes.c_int(fn.fd)
        c = self.config
        one = ctypes.c_uint8(1)
        if c.pids:
            self.add_pids(c.pids)
        for table, names in (("comm_filter", c.comms), ("exclude_comm_filter", c.exclude_comms)):
            if names:
                t = self.bpf[table.encode()]
                for name in names:
                    key = t.Key()
                    key.c = name.encode()[:15]
                    t[key] = one
        if c.ports:
            self.add_ports(c.ports)
        # Names are resolved again at attach: a namespace or cgroup made anew since the
        # config was read has a new inode.
        if c.netns:
            self._select(b"netns_filter", netns_inodes(c.netns).values())
        if c.cgroups:
            self._select(b"cgroup_filter", [cg for cg, _ in cgroup_ids(c.cgroups).values()])
        # Read in bulk from the mapping, not through BCC's per-record ctypes callback.
        self._decode = make_decoder(self.protocol_names)
        self.ring = RingBuffer(self.bpf[b"events"].map_fd, self.config.ringbuf_pages * PAGE)
        if self.go is not None:
            # Verified now, whatever runs: a kernel's verifier refusing them fails start-up,
            # not the first Go program met later.
            for name in sorted({p for pair in GO_PROGRAMS.values() for p in pair if p}):
                self.bpf.load_func(name.encode(), BPF.KPROBE)
            self.go.ring = RingBuffer(self.bpf[b"go_events"].map_fd, GO_RING_PAGES * PAGE)
            self.go.rescan(self.bpf, [int(p) for p in os.listdir("/proc") if p.isdigit()])
        self._arm()  # start recording now
        if self.asyncio is not None:
            self.asyncio.rescan(self.bpf, force=True)

    def _arm(self):
        """Start recording, or make the kernel drop the filter verdicts its threads cached
        (``armed`` holds the filters' generation, never 0 once armed)."""
        self._generation = self._generation % 0xFFFFFFFF + 1
        self.bpf[b"armed"][ctypes.c_int(0)] = ctypes.c_uint32(self._generation)

    def quiesce(self):
        """Stop recording (shut-down): new calls are no longer selected, so the ring only
        holds what the agent still has to drain."""
        if self.bpf is not None:
            self.bpf[b"armed"][ctypes.c_int(0)] = ctypes.c_uint32(0)

    def _select(self, table: bytes, keys):
        """Put `keys` in filter map `table` (pid_filter, port_filter)."""
        t = self.bpf[table]
        for key in keys:
            t[t.Key(key)] = ctypes.c_uint8(1)

    def _unselect(self, table: bytes, keys):
        """Take `keys` out of filter map `table`; those not in it are passed over."""
        t = self.bpf[table]
        for key in keys:
            try:
                del t[t.Key(key)]
            except KeyError:
                pass

    def add_pids(self, pids):
        """Select more processes at run time (needs a config with a non-empty ``pids``)."""
        self._select(b"pid_filter", pids)
        if self._generation:
            self._arm()

    def remove_pids(self, pids):
        self._unselect(b"pid_filter", pids)
        self._arm()

    def add_ports(self, ports):
        """Select more ports at run time (needs a config with a non-empty ``ports``)."""
        self._select(b"port_filter", ports)

    def remove_ports(self, ports):
        self._unselect(b"port_filter", ports)

    def poll(self, timeout_ms: int | None = None) -> list:
        if timeout_ms is None:
            timeout_ms = self.config.poll_ms
        out: list = []
        # Wake-ups are batched in the kernel: the wait may time out with data waiting.
        if self.ring.wait(timeout_ms):
            self.ring.consume(self._decode, out, BATCH_RECORDS)
        go = self.go
        if go is not None:
            # Drained after the records: a goroutine's spawn precedes its records, so every
            # edge a record needs is in by now.
            execs = go.exec_pids()
            go.annotate(out)
            if time.monotonic() >= self._go_next_full:  # the safety net: execs missed
                execs = [int(p) for p in os.listdir("/proc") if p.isdigit()]
                self._go_next_full = time.monotonic() + GO_RESCAN_S
            if execs and go.rescan(self.bpf, execs) and self._generation:
                self._arm()   # threads cache go_procs with their filter verdict
        if self.asyncio is not None:
            self.asyncio.rescan(self.bpf)
        return out

    def stats(self) -> dict:
        if self.bpf is None:
            return {}
        out = bpf.counters(self.bpf, STAT_NAMES)
        # Calls the kernel skipped our program for (another BPF program was running on
        # that CPU): lost before any counter of ours could see them.
        out["prog_recursion_misses"] = sum(bpf.recursion_misses(self.bpf).values())
        out["decode_failed"] = self.ring.decode_errors if self.ring else 0
        out["conn_map_entries"] = len(self.bpf[b"conns"])
        if self.go is not None:
            out.update(self.go.stats(self.bpf))
        if self.asyncio is not None:
            out.update(self.asyncio.stats())
        return out

    def gc(self):
        """Forget connections of processes that exited without close() (a thread's saved
        call arguments live in its task storage, which the kernel frees with the thread)."""
        if self.bpf is None:
            return
        table = self.bpf[b"conns"]
        for key in [k for k in table.keys() if not os.path.exists(f"/proc/{k.tgid}")]:
            try:
                del table[key]
            except KeyError:
                pass
        if self.go is not None:
            self.go.gc(self.bpf)

    def detach(self):
        # What the ring still holds is the caller's to drain first (the agent does, after
        # quiesce()): records polled here would have nowhere to go.
        if self.bpf is not None:
            if self.ring is not None:
                self.ring.close()  # unmap first: the mapping keeps the map alive
                self.ring = None
            if self.go is not None and self.go.ring is not None:
                self.go.ring.close()
                self.go.ring = None
            self.bpf.cleanup()
            self.bpf = None

