"""The trace probe on real sockets between two real processes, every traced syscall.

Each case runs a server and a client (tests/peers.py) that move known bytes with one
egress and one ingress syscall, over IPv4 and IPv6, TCP and UDP, and asserts the records
exactly against what the processes themselves saw (getsockname/getpeername, fds, bytes).
"""

import pytest

from conftest import Peer
from peers import MSG_A, MSG_B, MSG_C

PAIRS = [("write", "read"), ("writev", "readv"), ("sendto", "recvfrom"),
         ("sendmsg", "recvmsg"), ("sendmmsg", "recvmmsg")]
ANY = {"ipv4": "0.0.0.0", "ipv6": "::"}


def run_pair(tracer, family, l4, how_send, how_recv, accept="accept4"):
    server = Peer("server", family, l4, how_send, how_recv, accept)
    tracer.probe.add_pids([server.pid])
    server.go()
    port = server.line()["port"]
    client = Peer("client", family, l4, how_send, how_recv, port)
    tracer.probe.add_pids([client.pid])
    client.go()
    creport, sreport = client.finish(), server.finish()
    data = {how_send, how_recv}
    expected = 6 if l4 == "tcp" else 4

    def done(records):
        n = sum(1 for r in records if r.pid in (client.pid, server.pid) and r.syscall in data)
        closes = sum(1 for r in records if r.pid in (client.pid, server.pid)
                     and r.syscall == "close")
        return n >= expected and closes >= 2

    tracer.wait_for(done)
    tracer.probe.remove_pids([client.pid, server.pid])
    return creport, sreport, tracer.of(client.pid), tracer.of(server.pid)


def data_records(records, *syscalls):
    return [r for r in records if r.syscall in syscalls]


def check_record(rec, report, syscall, direction, payload, l4, family, remote):
    assert rec.syscall == syscall
    assert rec.direction == direction
    assert rec.pid == report["pid"] and rec.tid == report["tid"]
    assert rec.fd == report["fd"]
    assert rec.l4 == l4 and rec.family == family
    assert [rec.local_addr, rec.local_port] == report["local"]
    assert [rec.remote_addr, rec.remote_port] == remote
    assert rec.bytes == len(payload)
    assert rec.payload == payload
    assert rec.ts_enter_ns <= rec.ts_exit_ns
    if l4 == "tcp":
        assert rec.tcp_seq_end - rec.tcp_seq_start == rec.bytes
    else:
        assert rec.tcp_seq_start is None and rec.tcp_seq_end is None


@pytest.mark.bpf
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
@pytest.mark.parametrize("how_send,how_recv", PAIRS)
def test_tcp_pair(tracer, family, how_send, how_recv):
    accept = "accept" if how_recv == "read" else "accept4"
    crep, srep, crecs, srecs = run_pair(tracer, family, "tcp", how_send, how_recv, accept)
    assert crep["peer"] == srep["local"] and srep["peer"] == crep["local"]

    c = data_records(crecs, how_send, how_recv)
    s = data_records(srecs, how_send, how_recv)
    assert [r.syscall for r in c] == [how_send, how_recv, how_send]
    assert [r.syscall for r in s] == [how_recv, how_send, how_recv]
    for rec, msg in zip(c, (MSG_A, MSG_B, MSG_C)):
        check_record(rec, crep, rec.syscall, "egress" if rec.syscall == how_send else "ingress",
                     msg, "tcp", family, crep["peer"])
    for rec, msg in zip(s, (MSG_A, MSG_B, MSG_C)):
        check_record(rec, srep, rec.syscall, "egress" if rec.syscall == how_send else "ingress",
                     msg, "tcp", family, srep["peer"])

    # Successive calls on one direction of the stream cover contiguous byte ranges ...
    assert c[0].tcp_seq_end == c[2].tcp_seq_start
    assert s[0].tcp_seq_end == s[2].tcp_seq_start
    # ... and both ends agree on the range of every message: the link between them.
    for a, b in ((c[0], s[0]), (s[1], c[1]), (c[2], s[2])):
        assert (a.tcp_seq_start, a.tcp_seq_end) == (b.tcp_seq_start, b.tcp_seq_end)

    # One connection id per side, stable across its calls, different between sides.
    assert len({r.conn_id for r in c}) == 1 and len({r.conn_id for r in s}) == 1
    assert c[0].conn_id != s[0].conn_id

    # Connection management: socket, connect, accept/accept4 and close are reported too.
    connect = [r for r in crecs if r.syscall == "connect"]
    assert len(connect) == 1 and connect[0].bytes == 0
    check_ctl(connect[0], crep, family, crep["peer"])
    assert connect[0].conn_id == c[0].conn_id
    sock = [r for r in crecs if r.syscall == "socket"]
    assert len(sock) == 1 and sock[0].fd == crep["fd"] and sock[0].bytes == crep["fd"]
    assert sock[0].local_port == 0 and sock[0].remote_port == 0
    acc = [r for r in srecs if r.syscall == accept]
    assert len(acc) == 1 and acc[0].bytes == srep["fd"]
    check_ctl(acc[0], srep, family, srep["peer"])
    assert acc[0].conn_id == s[0].conn_id
    close_c = [r for r in crecs if r.syscall == "close" and r.fd == crep["fd"]]
    assert len(close_c) == 1 and close_c[0].conn_id == c[0].conn_id
    check_ctl(close_c[0], crep, family, crep["peer"])
    close_s = [r for r in srecs if r.syscall == "close" and r.fd == srep["fd"]]
    assert len(close_s) == 1 and close_s[0].conn_id == s[0].conn_id


def check_ctl(rec, report, family, remote):
    assert rec.direction == "none" and rec.l4 == "tcp" and rec.family == family
    assert rec.fd == report["fd"] and rec.pid == report["pid"]
    assert [rec.local_addr, rec.local_port] == report["local"]
    assert [rec.remote_addr, rec.remote_port] == remote
    assert rec.payload == b"" and rec.tcp_seq_start is None


@pytest.mark.bpf
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
@pytest.mark.parametrize("how_send,how_recv", PAIRS)
def test_udp_pair(tracer, family, how_send, how_recv):
    crep, srep, crecs, srecs = run_pair(tracer, family, "udp", how_send, how_recv)
    c = data_records(crecs, how_send)
    s = data_records(srecs, how_recv)
    assert len(c) == 2 and len(s) == 2
    for rec, msg in zip(c, (MSG_A, MSG_C)):
        # Connected or addressed, the destination is the server's bound address.
        check_record(rec, crep, how_send, "egress", msg, "udp", family, srep["local"])
    # The sender is known when the call asks for it (msg_name/addr); read/readv cannot.
    sender = [ANY[family], 0] if how_recv in ("read", "readv") else crep["local"]
    for rec, msg in zip(s, (MSG_A, MSG_C)):
        check_record(rec, srep, how_recv, "ingress", msg, "udp", family, sender)
    assert len({r.conn_id for r in c}) == 1 and len({r.conn_id for r in s}) == 1
