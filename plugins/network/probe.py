"""The network probe: TCP connection lifecycle records (like BCC's tcplife), retransmits,
resets, smoothed RTT, and bytes per process over TCP and UDP (network.bpf.c).

Records: one :class:`~.decoder.TcpConnection` (kind ``tcp_connection``) per connection
that reaches CLOSE, drained from a ring buffer at every poll without waiting.

Metrics (cumulative since attach), every ``interval``:

==================================  =========  ============  ==============================
name                                type       unit          attributes
==================================  =========  ============  ==============================
process.network.io                  sum        By            process.pid,
                                                             process.executable.name,
                                                             network.transport (tcp/udp),
                                                             network.io.direction
                                                             (transmit/receive)
deeptrace.tcp.connections           sum        {connection}  process.pid, process.executable.name
deeptrace.tcp.connection.io         sum        By            process.*, network.io.direction
deeptrace.tcp.retransmits           sum        {segment}     process.*
deeptrace.tcp.resets                sum        {reset}       process.*, network.io.direction
deeptrace.tcp.srtt                  histogram  s             (none)
deeptrace.tcp.connection.duration   histogram  s             (none)
==================================  =========  ============  ==============================

``process.network.io`` counts what sendmsg/recvmsg moved on IPv4/IPv6 TCP and UDP
sockets (tracepoints sock:sock_send_length / sock:sock_recv_length, which fire in the
calling process after every socket send/receive: write, send*, read, recv*, splice,
io_uring alike; MSG_PEEK reads are not counted; before Linux 6.3, which lacks them,
kprobes on inet(6)_sendmsg/recvmsg where the kernel has kprobes). ``deeptrace.tcp.connections`` and
``deeptrace.tcp.connection.io`` count closed connections and their bytes
(tcp_sock.bytes_received / bytes_acked at CLOSE). A connection's process is the one that
called connect(), else the first to send or receive on it, else the one that closed it;
connections with none of these (and resets sent without a socket, e.g. to a SYN on a
closed port, traced from Linux 6.10) count for process.pid "unknown". The agent's own
connections and bytes are never counted.
"""

import logging
import os
import time

import attrs
from attrs import validators as v

from deeptrace_core import bpf
from deeptrace_core.metricprobe import BpfMetricProbe, ProcessConfig, power_of_two
from deeptrace_core.metrics import HISTOGRAM, SUM, MetricPoint, log2_bounds
from deeptrace_core.proccounters import ProcessCounters, accumulate, busiest, labels, task_name

from .decoder import STAT_NAMES, decode

log = logging.getLogger("deeptrace.network")

NSLOTS = 40                     # log2 buckets in microseconds: 1 us .. 2^39 us (6.4 days)
US_BOUNDS = log2_bounds(1e-6, NSLOTS)
H_SRTT, H_DURATION = 0, 1
TRANSPORTS = {6: "tcp", 17: "udp"}
IO_DIRECTIONS = ("receive", "transmit")
UNKNOWN = "unknown"
UNKNOWN_LABELS = (("process.pid", UNKNOWN), ("process.executable.name", UNKNOWN))
KERNEL_FIELDS = (
    "tcp_sock.bytes_received",
    "tcp_sock.bytes_acked",
    "tcp_sock.srtt_us",
    "tcp_sock.total_retrans",
    "tcp_sock.snd_una",
    "tcp_sock.write_seq",
    "sock.__sk_common",
    "sock_common.skc_flags",      # sk->sk_flags
    # read only where bytes per process come from kprobes (kernels before 6.3)
    "socket.sk",
    "sock.sk_protocol",
    "sock_common.skc_family",
    "pt_regs.di",                 # inet(6)_sendmsg/recvmsg's sock, recv flags, return
    "pt_regs.cx",
    "pt_regs.ax",
)
# Where the sock:sock_{send,recv}_length tracepoints are missing (Linux < 6.3), bytes per
# process come from these functions' kprobes: (function, entry program, return program).
IO_KPROBES = (("inet_sendmsg", "io_send_enter", "io_send_exit"),
              ("inet6_sendmsg", "io_send_enter", "io_send_exit"),
              ("inet_recvmsg", "io_recv_enter", "io_recv_exit"),
              ("inet6_recvmsg", "io_recv_enter", "io_recv_exit"))
# enum sock_flags { SOCK_DEAD, SOCK_DONE, ... }: unchanged since Linux 2.6; a test checks
# it against the kernel's BTF (bpftool).
SOCK_DONE_BIT = 1


@attrs.define
class NetworkConfig(ProcessConfig):
    """``probes.network`` in the YAML config."""

    max_connections: int = attrs.field(default=65536, validator=[v.ge(64), v.le(1 << 22)])
    ringbuf_pages: int = attrs.field(default=64, validator=power_of_two)


class NetworkProbe(BpfMetricProbe):
    name = "network"
    config_class = NetworkConfig
    kernel_fields = KERNEL_FIELDS
    source = ("deeptrace_plugins.network", "network.bpf.c")
    stat_names = STAT_NAMES

    def __init__(self, config: NetworkConfig, context=None):
        super().__init__(config, context)
        self.self_pid = os.getpid()
        # Whether resets the kernel sends without a socket (a SYN to a closed port) are
        # seen: tcp:tcp_send_reset fires for them from Linux 6.10, which added its `reason`
        # field (NO_SOCKET among the reasons) in the same release; before, only resets of
        # a socket are counted.
        self.socketless_resets = bpf.tracepoint_has_field("tcp", "tcp_send_reset", "reason")
        # How bytes per process are counted on this kernel: "tracepoints", "kprobes" or
        # "unavailable" (then process.network.io is not reported; said once at attach).
        if bpf.tracepoint_exists("sock", "sock_send_length"):
            self.io_source = "tracepoints"
        else:
            from deeptrace_core import features
            self.io_source = "kprobes" if features.kprobes()[0] else "unavailable"
        # Per-process maps; gc() folds exited processes out of them.
        self._io = ProcessCounters(b"proc_io", lambda k: (k.tgid, task_name(k.comm), k.proto, k.dir),
                                   lambda v: (v.bytes, v.calls), config.max_processes)
        self._tcp = ProcessCounters(
            b"tcp_procs", lambda k: (k.tgid, task_name(k.comm)),
            lambda v: (v.closed, v.retrans, v.rst_sent, v.rst_recv, v.bytes_received,
                       v.bytes_acked), config.max_processes)

    # -- build --------------------------------------------------------------------------
    def defines(self) -> dict:
        c = self.config
        return {"CONN_MAX": c.max_connections, "PROC_MAX": c.max_processes,
                "RINGBUF_PAGES": c.ringbuf_pages, "NSLOTS": NSLOTS,
                "SELF_TGID": self.self_pid, "SOCK_DONE_BIT": SOCK_DONE_BIT,
                "SOCK_IO_TP": int(self.io_source == "tracepoints"),
                "IO_KPROBES": int(self.io_source == "kprobes")}

    # -- run ----------------------------------------------------------------------------
    def attach(self, defines: dict):
        self.load(defines)
        if self.io_source == "kprobes":
            for event, enter, ret in IO_KPROBES:
                self.bpf.attach_kprobe(event=event, fn_name=enter.encode())
                self.bpf.attach_kretprobe(event=event, fn_name=ret.encode())
            log.info("network: bytes per process from kprobes on inet(6)_sendmsg/recvmsg "
                     "(this kernel has no sock:sock_send_length tracepoint)")
        elif self.io_source == "unavailable":
            log.warning("network: process.network.io unavailable: this kernel has neither "
                        "the sock:sock_send_length tracepoint (Linux >= 6.3) nor kprobes")
        self.open_ring(b"events", decode)

    def poll(self, timeout_ms: int | None = None) -> list:
        """Never blocks: the connection records closed so far, plus every metric point
        when due (deeptrace_core.metricprobe)."""
        out = self.take_records()
        if self.due(timeout_ms):
            out += self.collect()
        return out

    # -- reading the maps ---------------------------------------------------------------
    def process_io(self) -> dict:
        """(pid, comm, transport, direction) -> [bytes, calls], exited processes included."""
        return self._io.read(self.bpf)

    def process_tcp(self) -> dict:
        """(pid, comm) -> [closed, retransmits, resets sent, resets received,
        bytes received, bytes acked] (pid 0: unknown)."""
        return self._tcp.read(self.bpf)

    def histograms(self) -> dict:
        """kind (H_SRTT, H_DURATION) -> ([count per slot], sum in us)."""
        out = {H_SRTT: [[0] * (NSLOTS + 1), 0], H_DURATION: [[0] * (NSLOTS + 1), 0]}
        for k, val in self.bpf[b"hists"].items():
            h = out.setdefault(k.kind, [[0] * (NSLOTS + 1), 0])
            h[0][min(k.slot, NSLOTS)] += val.count
            h[1] += val.sum
        return out

    def collect(self) -> list:
        now = time.time_ns()
        io, tcp = self.process_io(), self.process_tcp()
        # Busiest processes by bytes, then calls and events; the rest become pid "other".
        load: dict = {}
        for (pid, comm, _, _), vals in io.items():
            accumulate(load, (pid, comm), vals)
        for (pid, comm), vals in tcp.items():
            accumulate(load, (pid, comm), (vals[4] + vals[5], sum(vals[:4])))
        top = busiest(self.config.top_n, load)

        def who(pid, comm):
            return UNKNOWN_LABELS if pid == 0 else labels(pid, comm, top)

        def point(name, unit, value, attributes, desc):
            return MetricPoint(name, SUM, unit, value, attributes, desc,
                               start_ns=self.start_ns, time_ns=now)

        points = []
        sums: dict = {}
        for (pid, comm, proto, d), (nbytes, _) in io.items():
            key = (who(pid, comm), TRANSPORTS.get(proto, str(proto)), IO_DIRECTIONS[d])
            sums[key] = sums.get(key, 0) + nbytes
        for (proc, transport, direction), nbytes in sorted(sums.items(), key=str):
            points.append(point("process.network.io", "By", nbytes,
                                {**dict(proc), "network.transport": transport,
                                 "network.io.direction": direction},
                                "Bytes sent/received through socket calls of the process"))
        per: dict = {}
        for (pid, comm), vals in tcp.items():
            accumulate(per, who(pid, comm), vals)
        for proc, (closed, retrans, rst_tx, rst_rx, rx, tx) in sorted(per.items(), key=str):
            a = dict(proc)
            points += [
                point("deeptrace.tcp.connections", "{connection}", closed, dict(a),
                      "TCP connections of the process that closed"),
                point("deeptrace.tcp.connection.io", "By", rx,
                      {**a, "network.io.direction": "receive"},
                      "Bytes received on closed TCP connections (tcp_sock.bytes_received)"),
                point("deeptrace.tcp.connection.io", "By", tx,
                      {**a, "network.io.direction": "transmit"},
                      "Bytes sent and acknowledged on closed TCP connections"),
                point("deeptrace.tcp.retransmits", "{segment}", retrans, dict(a),
                      "TCP retransmissions (tcp:tcp_retransmit_skb)"),
                point("deeptrace.tcp.resets", "{reset}", rst_tx,
                      {**a, "network.io.direction": "transmit"}, "TCP resets sent"),
                point("deeptrace.tcp.resets", "{reset}", rst_rx,
                      {**a, "network.io.direction": "receive"}, "TCP resets received"),
            ]
        hists = self.histograms()
        for kind, name, desc in ((H_SRTT, "deeptrace.tcp.srtt",
                                  "Smoothed RTT of TCP connections at close"),
                                 (H_DURATION, "deeptrace.tcp.connection.duration",
                                  "Lifetime of TCP connections, first state change to close")):
            counts, total_us = hists[kind]
            points.append(MetricPoint(name, HISTOGRAM, "s", 0, {}, desc, bounds=US_BOUNDS,
                                      counts=tuple(counts), count=sum(counts),
                                      sum=total_us / 1e6, start_ns=self.start_ns,
                                      time_ns=now))
        return points

    # -- housekeeping -------------------------------------------------------------------
    def gc(self):
        """Fold exited processes out of the kernel maps; their totals are kept here."""
        if self.bpf is None:
            return
        self._io.gc(self.bpf)
        self._tcp.gc(self.bpf)

    def stats(self) -> dict:
        if self.bpf is None:
            return {}
        out = self.counters()
        out["decode_failed"] = self.decode_errors
        out["prog_recursion_misses"] = sum(bpf.recursion_misses(self.bpf).values())
        out["conn_map_entries"] = len(self.bpf[b"conns"])
        return out
