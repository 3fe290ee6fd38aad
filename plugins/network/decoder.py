"""Decodes network.bpf.c's ``struct close_t`` into :class:`TcpConnection`.

The struct layout below mirrors the C struct field by field; change both together.
"""

import struct
import time

import attrs

from deeptrace_core.addresses import FAMILIES, address, endpoint

# struct close_t: see network.bpf.c.
CLOSE = struct.Struct("<QQQQQIIIIIIHHHBBB7x16s16s16s")
assert CLOSE.size == 128

TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
              6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN",
              11: "CLOSING", 12: "NEW_SYN_RECV"}
OWNER_SOURCES = {0: None, 1: "connect", 2: "io", 3: "close"}
F_SELF, F_BIRTH = 1, 2

# Counter slots of the `stats` per-CPU array, in C enum order.
STAT_NAMES = ("closed", "ringbuf_full", "conn_map_full", "proc_map_full", "hist_map_full",
              "read_failed", "unknown_connection", "reset_without_socket", "lost_close",
              "io_args_full")

# bpf_ktime_get_ns() is CLOCK_MONOTONIC; records carry wall-clock ns.
_MONO_TO_WALL = time.time_ns() - time.monotonic_ns()


@attrs.define(slots=True)
class TcpConnection:
    """One TCP connection, reported when it reaches CLOSE (like BCC's tcplife)."""

    ts_ns: int                    # wall-clock ns of the CLOSE
    start_ns: int | None          # wall-clock ns of its first state change (None: before attach)
    duration_ns: int | None
    pid: int                      # 0: unknown (accepted, never read nor written, not closed by a process)
    comm: str
    owner: str | None             # how pid was found: connect | io (first send/recv) | close
    family: str
    local_addr: str
    local_port: int
    remote_addr: str
    remote_port: int
    # Data bytes, from tcp_sock.bytes_received / bytes_acked at CLOSE less the SYN and
    # FINs they count (see network.bpf.c). bytes_sent is what the peer acknowledged. For
    # a connection opened before the probe attached, bytes_sent may include 1 for its SYN.
    bytes_received: int
    bytes_sent: int
    srtt_us: int                  # tcp_sock.srtt_us >> 3 at CLOSE; 0 if never measured
    retransmits: int              # tcp:tcp_retransmit_skb seen since the probe attached
    total_retrans: int            # the kernel's lifetime count (tcp_sock.total_retrans)
    resets_sent: int
    resets_received: int
    last_state: str               # the state it closed from (SYN_SENT + a reset: refused)

    kind = "tcp_connection"

    def to_dict(self) -> dict:
        d = attrs.asdict(self)
        d["kind"] = self.kind
        return d

    def line(self) -> str:
        t = time.strftime("%H:%M:%S", time.localtime(self.ts_ns / 1e9))
        ms = (self.ts_ns // 1_000_000) % 1000
        dur = f"{self.duration_ns / 1e6:.3f}ms" if self.duration_ns is not None else "?"
        who = f"{self.comm}[{self.pid}]" if self.pid else "?"
        extra = ""
        if self.retransmits or self.total_retrans:
            extra += f" retrans={self.retransmits}/{self.total_retrans}"
        if self.resets_sent or self.resets_received:
            extra += f" rst_tx={self.resets_sent} rst_rx={self.resets_received}"
        return (f"{t}.{ms:03d} tcp {who} {endpoint(self.local_addr, self.local_port)} <-> "
                f"{endpoint(self.remote_addr, self.remote_port)} tx={self.bytes_sent} "
                f"rx={self.bytes_received} dur={dur} srtt={self.srtt_us}us "
                f"from={self.last_state}{extra}")


def decode(buf: bytes) -> TcpConnection:
    """One ring-buffer record to a TcpConnection; raises ValueError on a malformed one."""
    if len(buf) < CLOSE.size:
        raise ValueError(f"record of {len(buf)} bytes is shorter than struct close_t")
    (ts, birth, _sk, rx, tx, tgid, srtt, retrans, total, rst_sent, rst_recv, sport, dport,
     family, oldstate, owner_src, flags, saddr, daddr, comm) = CLOSE.unpack_from(buf)
    if family not in FAMILIES:
        raise ValueError(f"unknown address family {family}")
    return TcpConnection(
        ts_ns=ts + _MONO_TO_WALL,
        start_ns=birth + _MONO_TO_WALL if birth else None,
        duration_ns=ts - birth if birth else None,
        pid=tgid,
        comm=comm.split(b"\0", 1)[0].decode("utf-8", "replace"),
        owner=OWNER_SOURCES.get(owner_src),
        family=FAMILIES[family],
        local_addr=address(family, saddr), local_port=sport,
        remote_addr=address(family, daddr), remote_port=dport,
        bytes_received=rx, bytes_sent=tx, srtt_us=srtt,
        retransmits=retrans, total_retrans=total,
        resets_sent=rst_sent, resets_received=rst_recv,
        last_state=TCP_STATES.get(oldstate, str(oldstate)),
    )
