"""The trace decoder on bytes: no kernel needed. Malformed records raise (the ring-buffer
reader counts them and goes on: tests/test_ringbuf.py)."""

import socket

import pytest

from deeptrace_plugins.trace import decoder
from deeptrace_plugins.trace.probe import TraceConfig


def raw(payload=b"hello", **kw):
    f = dict(ts_enter=100, ts_exit=250, conn_id=7, loop_iter=0, atask=0, ret=len(payload), pid=10, tid=11, fd=3,
             seq=4294967290, plen=len(payload), msg_index=0, sysno=8, family=socket.AF_INET6,
             lport=8080, rport=40000, direction=2, l4=1, flags=decoder.F_SEQ, l7_proto=0, l7_role=0, tcp_state=1,
             laddr=socket.inet_pton(socket.AF_INET6, "::1"),
             raddr=socket.inet_pton(socket.AF_INET6, "fe80::1"), comm=b"myserver\0junk\0\0\0",
             goid=0)
    f.update(kw)
    return decoder.HEADER.pack(*f.values()) + payload


def test_decode_fields():
    r = decoder.decode(raw())
    assert (r.syscall, r.direction, r.l4, r.family) == ("sendto", "egress", "tcp", "ipv6")
    assert (r.local_addr, r.local_port, r.remote_addr, r.remote_port) == ("::1", 8080, "fe80::1", 40000)
    assert (r.pid, r.tid, r.fd, r.comm, r.conn_id, r.bytes) == (10, 11, 3, "myserver", 7, 5)
    assert r.ts_exit_ns - r.ts_enter_ns == 150
    # Sequence numbers wrap at 2**32 in TCP; the range keeps end - start == bytes.
    assert r.tcp_seq_start == 4294967290 and r.tcp_seq_end == 4294967295
    assert r.payload == b"hello" and r.to_dict()["payload"] == "aGVsbG8="
    assert r.goid == 0 and decoder.decode(raw(goid=123456789)).goid == 123456789
    assert "sendto fd=3 tcp/ipv6 [::1]:8080 -> [fe80::1]:40000 bytes=5" in r.line()


def test_decode_ipv4_udp_without_seq():
    r = decoder.decode(raw(family=socket.AF_INET, l4=2, flags=0,
                           laddr=socket.inet_aton("10.1.2.3") + bytes(12),
                           raddr=socket.inet_aton("127.0.0.1") + bytes(12), sysno=3, direction=1))
    assert (r.local_addr, r.remote_addr, r.l4, r.syscall, r.direction) == (
        "10.1.2.3", "127.0.0.1", "udp", "recvfrom", "ingress")
    assert r.tcp_seq_start is None and r.tcp_seq_end is None


def test_l7_protocol_and_role():
    r = decoder.decode(raw(l7_proto=2, l7_role=2), protocols=("http1", "redis"))
    assert (r.protocol, r.role) == ("redis", "server")
    r = decoder.decode(raw(l7_proto=9, l7_role=1), protocols=("http1",))
    assert (r.protocol, r.role) == (None, "client")


def test_execution_unit_fields():
    r = decoder.decode(raw(loop_iter=12345, atask=0x7F00DEADBEEF))
    assert (r.loop_iter, r.asyncio_task) == (12345, 0x7F00DEADBEEF)
    assert r.to_dict()["loop_iter"] == 12345 and r.to_dict()["asyncio_task"] == 0x7F00DEADBEEF
    assert (decoder.decode(raw()).loop_iter, decoder.decode(raw()).asyncio_task) == (0, 0)


def test_task_edge_records():
    """A task_edge_t (32 bytes) is told from a socket record by its length."""
    blob = decoder.TASK_EDGE.pack(500, 0x7F0000001000, 0x7F0000002000, 42, 43)
    e = decoder.decode(blob)
    assert isinstance(e, decoder.TaskEdge) and e.kind == "asyncio_task"
    assert (e.pid, e.tid, e.child, e.parent) == (42, 43, 0x7F0000001000, 0x7F0000002000)
    assert e.ts_ns == 500 + decoder._MONO_TO_WALL
    assert e.to_dict()["child"] == 0x7F0000001000 and "created by 0x7f0000002000" in e.line()
    with pytest.raises(ValueError):   # any other short length is still malformed
        decoder.decode(blob[:24])


def test_control_calls_report_return_value():
    r = decoder.decode(raw(payload=b"", sysno=12, direction=0, ret=-111, flags=0))
    assert r.syscall == "connect" and r.bytes == -111 and "ret=-111" in r.line()


@pytest.mark.parametrize("blob", [b"", b"\0" * 50, raw()[:119], raw(plen=99)])
def test_malformed_records_raise(blob):
    with pytest.raises(ValueError):
        decoder.decode(blob)


def test_decode_in_place_matches_and_rejects_short_records():
    dec = decoder.make_decoder(("http1",))
    blob = bytearray(b"\xff" * 8) + raw(l7_proto=1) + b"\xee" * 8
    r = dec(memoryview(blob), 8, len(blob) - 16)
    assert r == decoder.decode(raw(l7_proto=1), ("http1",)) and r.protocol == "http1"
    with pytest.raises(ValueError):
        dec(memoryview(blob), 8, decoder.HEADER.size - 1)
    with pytest.raises(ValueError):  # payload length past the record
        dec(memoryview(raw(plen=6)), 0, len(raw(plen=6)))


def test_config_bounds():
    with pytest.raises(ValueError):
        TraceConfig(ringbuf_pages=3)
    with pytest.raises(ValueError):
        TraceConfig(payload_bytes=1 << 20)
