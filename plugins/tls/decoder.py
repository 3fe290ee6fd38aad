"""Decodes tls.bpf.c's ``struct tls_event_t``: TLS plaintext as the trace probe's
:class:`SocketRecord` with ``tls=True`` (so every protocol parser applies unchanged), and
the probe's own control events.

The struct layout below mirrors the C struct field by field; change both together.
"""

import struct

import attrs

from deeptrace_core import clock
from deeptrace_core.addresses import FAMILIES, address
from deeptrace_plugins.trace.decoder import SocketRecord

HEADER = struct.Struct("<QQQQqIIiIIIHHHBBBB6x16s16s16s")
assert HEADER.size == 128

# The OP_* enums of tls.bpf.c and gotls.bpf.c: one numbering for both, since both write
# struct tls_event_t (tests/test_tls_units.py checks this against the C source).
OP_IDS = {"OP_READ": 1, "OP_WRITE": 2, "OP_READ_EX": 3, "OP_WRITE_EX": 4, "OP_HANDSHAKE": 5,
          "OP_GO_READ": 6, "OP_GO_WRITE": 7, "OP_GO_HANDSHAKE": 8}
# The ops that send records (the handshakes never do), as the record's `syscall`.
OPS = {OP_IDS["OP_READ"]: "SSL_read", OP_IDS["OP_WRITE"]: "SSL_write",
       OP_IDS["OP_READ_EX"]: "SSL_read_ex", OP_IDS["OP_WRITE_EX"]: "SSL_write_ex",
       OP_IDS["OP_GO_READ"]: "go_tls_read", OP_IDS["OP_GO_WRITE"]: "go_tls_write"}
WRITE_OPS = frozenset(OP_IDS[n] for n in ("OP_WRITE", "OP_WRITE_EX", "OP_GO_WRITE"))
EV_DATA, EV_CLOSE, EV_LOADED = 1, 2, 3
F_SEQ, F_TRUNC = 1, 2

# Counter slots of the `stats` per-CPU array, in C enum order.
STAT_NAMES = ("events", "ringbuf_full", "read_failed", "thread_state_failed",
              "ssl_map_full", "mapped_nested", "mapped_ssl_map", "mapped_neighbour",
              "unmapped_read", "unmapped_write", "not_tcp")


@attrs.define(slots=True)
class Control:
    """An event that is not a record: a connection's end (EV_CLOSE: its SSL* was freed),
    or a process whose link map changed (EV_LOADED)."""

    kind: int
    pid: int
    tid: int
    conn_id: int = 0


def make_decoder():
    """``decode_at(data, offset, length)`` for the ring-buffer reader: a SocketRecord
    (tls=True) or a :class:`Control`."""
    unpack, hsize = HEADER.unpack_from, HEADER.size
    mono_to_wall = clock.MONO_TO_WALL
    comms: dict = {}
    addrs: dict = {}

    def addr(family, raw):
        key = (family, raw)
        text = addrs.get(key)
        if text is None:
            if len(addrs) > 65536:
                addrs.clear()
            text = addrs[key] = address(family, raw) if family else ""
        return text

    def decode_at(data, off, length):
        if length < hsize:
            raise ValueError(f"record of {length} bytes is shorter than its header")
        (ts_enter, ts_exit, conn_id, _ssl, ret, pid, tid, fd, seq_start, seq_end, plen,
         family, lport, rport, kind, op, _rule, flags, laddr, raddr, comm) = unpack(data, off)
        if kind == EV_LOADED:
            return Control(kind, pid, tid)
        if kind == EV_CLOSE:
            return Control(kind, pid, tid, conn_id)
        if plen > length - hsize:
            raise ValueError(f"payload length {plen} exceeds the record")
        name = comms.get(comm)
        if name is None:
            if len(comms) > 4096:
                comms.clear()
            name = comms[comm] = comm.split(b"\0", 1)[0].decode("utf-8", "replace")
        seq = (seq_start, seq_end) if flags & F_SEQ else (None, None)
        if kind != EV_DATA or op not in OPS:
            raise ValueError(f"unknown TLS event kind {kind} op {op}")
        start = off + hsize
        writing = op in WRITE_OPS
        rec = SocketRecord(ts_enter + mono_to_wall, ts_exit + mono_to_wall, pid, tid, name, fd,
                           OPS[op], "egress" if writing else "ingress", "tcp",
                           FAMILIES.get(family, str(family)),
                           addr(family, laddr), lport, addr(family, raddr), rport, ret, *seq,
                           bytes(data[start:start + plen]), conn_id,
                           truncated=bool(flags & F_TRUNC), tls=True)
        return rec

    return decode_at
