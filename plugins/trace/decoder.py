"""Decodes trace.bpf.c's ``struct event_t`` into :class:`SocketRecord`.

The struct layout below mirrors the C struct field by field; change both together.
"""

import base64
import struct
import time

import attrs

from deeptrace_core import clock

from deeptrace_core.addresses import FAMILIES, address, endpoint

# struct event_t header (before payload): see trace.bpf.c.
HEADER = struct.Struct("<QQQQQqIIiIIHHHHHBBBBBB4x16s16s16sQ")
assert HEADER.size == 144
# struct task_edge_t (asyncio: a Task's creation and its creator), told apart by length.
TASK_EDGE = struct.Struct("<QQQII")

SYSCALLS = {1: "read", 2: "readv", 3: "recvfrom", 4: "recvmsg", 5: "recvmmsg",
            6: "write", 7: "writev", 8: "sendto", 9: "sendmsg", 10: "sendmmsg",
            11: "socket", 12: "connect", 13: "accept", 14: "accept4", 15: "close"}
DIRECTIONS = {0: "none", 1: "ingress", 2: "egress"}
L4 = {1: "tcp", 2: "udp"}
F_SEQ, F_PEEK, F_TRUNC, F_IOV_TRUNC = 1, 2, 4, 8
ROLES = {0: None, 1: "client", 2: "server"}

# Counter slots of the `stats` per-CPU array, in C enum order.
STAT_NAMES = ("events", "ringbuf_full", "inflight_alloc_failed", "conn_map_full",
              "read_failed", "mmsg_truncated", "iov_truncated", "l7_tail_call_failed",
              "asyncio_task_edges", "asyncio_task_depth_exceeded", "loop_slots_taken")
LOSS_STATS = ("ringbuf_full", "inflight_alloc_failed", "conn_map_full", "read_failed",
              "mmsg_truncated", "prog_recursion_misses")

# bpf_ktime_get_ns() is CLOCK_MONOTONIC; records carry wall-clock ns (deeptrace_core.clock).
_MONO_TO_WALL = clock.MONO_TO_WALL


@attrs.define(slots=True)
class SocketRecord:
    ts_enter_ns: int
    ts_exit_ns: int
    pid: int
    tid: int
    comm: str
    fd: int
    syscall: str
    direction: str
    l4: str
    family: str
    local_addr: str
    local_port: int
    remote_addr: str
    remote_port: int
    bytes: int
    tcp_seq_start: int | None
    tcp_seq_end: int | None
    payload: bytes
    conn_id: int
    msg_index: int = 0
    truncated: bool = False
    peek: bool = False
    protocol: str | None = None   # L7 protocol detected in the kernel, if enabled
    role: str | None = None       # this process's role on the connection: client/server
    # TLS plaintext from the tls probe: `syscall` names the SSL call, `bytes` and
    # `payload` are plaintext, and tcp_seq_start/end the ciphertext's TCP range (the
    # socket calls under the SSL call), so end - start is not `bytes` there.
    tls: bool = False
    # Go: the goroutine the call was made for (0: not a Go process), and its ancestors
    # by spawn, nearest first (goroutine.py), which the goroutine linker rule follows.
    goid: int = 0
    go_parents: tuple = ()
    # The execution unit: the thread's event-loop iterations so far (epoll_wait returns;
    # 0: it never waited) and the asyncio Task whose step made the call (0: none, or its
    # uprobes are not attached).
    loop_iter: int = 0
    asyncio_task: int = 0

    kind = "socket"

    def to_dict(self) -> dict:
        d = {name: getattr(self, name) for name in _FIELDS}  # shallow: every value is flat
        d["payload"] = base64.b64encode(self.payload).decode()
        return d

    def line(self) -> str:
        t = time.strftime("%H:%M:%S", time.localtime(self.ts_exit_ns / 1e9))
        us = (self.ts_exit_ns // 1000) % 1_000_000
        arrow = {"ingress": "<-", "egress": "->"}.get(self.direction, "--")
        seq = (f" seq={self.tcp_seq_start}-{self.tcp_seq_end}"
               if self.tcp_seq_start is not None else "")
        text = self.payload[:64].decode("latin-1").encode("unicode_escape").decode()
        lat = (self.ts_exit_ns - self.ts_enter_ns) / 1000
        size = f"bytes={self.bytes}" if self.direction != "none" else f"ret={self.bytes}"
        return (f"{t}.{us:06d} {self.comm}[{self.pid}/{self.tid}] {self.syscall} fd={self.fd} "
                f"{self.l4}/{self.family} {endpoint(self.local_addr, self.local_port)} {arrow} "
                f"{endpoint(self.remote_addr, self.remote_port)} {size}{seq} "
                f"conn={self.conn_id} {lat:.1f}us" + (f' "{text}"' if self.payload else ""))


_FIELDS = tuple(a.name for a in attrs.fields(SocketRecord))


@attrs.define(slots=True)
class TaskEdge:
    """asyncio: Task `child` (a TaskObj address in process `pid`) was created at `ts_ns`
    while Task `parent` ran on thread `tid` (0: outside any task). The traces processor
    follows these from a client call's task to the task that answers a request."""

    ts_ns: int
    pid: int
    tid: int
    child: int
    parent: int

    kind = "asyncio_task"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "ts_ns": self.ts_ns, "pid": self.pid, "tid": self.tid,
                "child": self.child, "parent": self.parent}

    def line(self) -> str:
        return (f"asyncio task {self.child:#x} created by {self.parent:#x} "
                f"[{self.pid}/{self.tid}]")


def decode(buf: bytes, protocols=()) -> SocketRecord:
    """One ring-buffer record to a SocketRecord; raises ValueError on a malformed one.

    `protocols` are the L7 protocol names in the order their detectors were compiled."""
    protocols = tuple(protocols)
    dec = _decoders.get(protocols)
    if dec is None:
        dec = _decoders[protocols] = make_decoder(protocols)
    return dec(buf, 0, len(buf))


_decoders: dict = {}


def make_decoder(protocols=()):
    """A decode for the ring-buffer reader: ``decode_at(data, offset, length)`` reads one
    record in place (no copy but the payload's) and returns what :func:`decode` returns.

    The hot path of the agent: addresses and process names repeat on every call of a
    connection, so their strings are cached rather than rebuilt per record."""
    unpack, hsize = HEADER.unpack_from, HEADER.size
    mono_to_wall = _MONO_TO_WALL
    # sysno is a u16 of our own numbering: names for the known ones, one shared "?" for
    # the rest (65,536 digit strings were 4 MB of the agent's idle memory).
    syscalls = [SYSCALLS.get(i, "?") for i in range(65536)]
    directions = [DIRECTIONS.get(i, str(i)) for i in range(256)]
    l4s = [L4.get(i, str(i)) for i in range(256)]
    roles = [ROLES.get(i) for i in range(256)]
    protos = [None] + [protocols[i - 1] if i <= len(protocols) else None
                       for i in range(1, 256)]
    families = {}
    caches = {}   # family -> {raw address: text}
    comms = {}
    trunc = F_TRUNC | F_IOV_TRUNC
    new = SocketRecord

    edge_size, unpack_edge = TASK_EDGE.size, TASK_EDGE.unpack_from

    def decode_at(data, off, length):
        if length < hsize:
            if length == edge_size:
                ts, child, parent, pid, tid = unpack_edge(data, off)
                return TaskEdge(ts + mono_to_wall, pid, tid, child, parent)
            raise ValueError(f"record of {length} bytes is shorter than its header")
        (ts_enter, ts_exit, conn_id, loop_iter, atask, ret, pid, tid, fd, seq, plen, msg_index,
         sysno, family, lport, rport, direction, l4, flags, l7_proto, l7_role, _tcp_state,
         laddr, raddr, comm, goid) = unpack(data, off)
        if plen > length - hsize:
            raise ValueError(f"payload length {plen} exceeds the record")
        cache = caches.get(family)
        if cache is None:
            cache = caches[family] = {}
            families[family] = FAMILIES.get(family, str(family))
        la = cache.get(laddr)
        if la is None:
            if len(cache) > 65536:
                cache.clear()
            la = cache[laddr] = address(family, laddr)
        ra = cache.get(raddr)
        if ra is None:
            if len(cache) > 65536:
                cache.clear()
            ra = cache[raddr] = address(family, raddr)
        name = comms.get(comm)
        if name is None:
            if len(comms) > 4096:
                comms.clear()
            name = comms[comm] = comm.split(b"\0", 1)[0].decode("utf-8", "replace")
        start = off + hsize
        if flags & F_SEQ:
            # End is start + bytes without wrapping, so end - start == bytes always.
            seq_end = seq + (ret if ret > 0 and sysno <= 10 else 0)
        else:
            seq = seq_end = None
        return new(ts_enter + mono_to_wall, ts_exit + mono_to_wall, pid, tid, name, fd,
                   syscalls[sysno], directions[direction], l4s[l4], families[family],
                   la, lport, ra, rport, ret, seq, seq_end, bytes(data[start:start + plen]),
                   conn_id, msg_index, bool(flags & trunc), bool(flags & F_PEEK),
                   protos[l7_proto], roles[l7_role], False, goid, (), loop_iter, atask)

    return decode_at
