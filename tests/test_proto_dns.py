"""DNS protocol plugin: the parser on messages built by dnspython (and on the bytes of real
dnspython queries over UDP and TCP to an in-test server), one per datagram, length-
prefixed over TCP (split, coalesced), cut by the capture, garbage; property tests; the
detector in Python and in the kernel."""

import socket
import threading

import dns.message
import dns.query
import dns.rcode
import dns.rrset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deeptrace_core import testing as kit
from deeptrace_core.l7 import REQ, REQUEST, RESP, RESPONSE
from deeptrace_plugins.protocols.dns.parser import DnsParser
from deeptrace_plugins.protocols.dns.plugin import DnsProtocol, detect

CAP = 1024


def query(name="known.example.", rdtype="A", **kw):
    return dns.message.make_query(name, rdtype, **kw)


def answer(q, rcode=dns.rcode.NOERROR, n=1, rdtype="A"):
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    if rcode == dns.rcode.NOERROR and n:
        name = q.question[0].name
        if rdtype == "A":
            rdata = [f"10.0.{i // 250}.{i % 250}" for i in range(n)]
        else:
            rdata = [f'"record {i} {"x" * 40}"' for i in range(n)]
        r.answer.append(dns.rrset.from_text_list(name, 60, "IN", rdtype, rdata))
    return r


def tcp(m):
    w = m.to_wire()
    return len(w).to_bytes(2, "big") + w


def parser(l4):
    p = DnsProtocol(DnsProtocol.config_class()).parser()
    p.l4 = l4
    return p


def run(l4, chunks, cap=None):
    p = parser(l4)
    return p, kit.feed(p, chunks, cap=cap)


def view(msgs):
    """What UDP and TCP framings of the same messages agree on (not their sizes)."""
    return kit.view(msgs, ("is_request", "operation", "status", "error", "key", "attributes"))


def pairs(msgs):
    return [(q.operation, r.status, r.error, r.attributes["dns.answer.count"])
            for q, r in kit.pairs(msgs)]


def test_udp_queries_and_answers():
    q1, q2, q3 = query(), query("missing.example.", "AAAA"), query("mx.example.", "MX")
    chunks = [(REQ, q1.to_wire()), (REQ, q2.to_wire()), (REQ, q3.to_wire()),
              # answered out of order
              (RESP, answer(q2, dns.rcode.NXDOMAIN).to_wire()),
              (RESP, answer(q3, dns.rcode.SERVFAIL).to_wire()),
              (RESP, answer(q1, n=3).to_wire())]
    p, msgs = run("udp", chunks)
    assert p.errors == 0
    assert pairs(msgs) == [("A known.example.", "NOERROR", False, 3),
                           ("AAAA missing.example.", "NXDOMAIN", True, 0),
                           ("MX mx.example.", "SERVFAIL", True, 0)]
    assert msgs[0].attributes == {"dns.question.name": "known.example",
                                  "dns.question.type": "A"}
    assert msgs[0].key == (q1.id, "known.example.", "A")
    assert [m.size for m in msgs] == [len(d) for _, d in chunks]
    assert msgs[3].ts_start == 30 and msgs[3].ts_end == 31


def test_key_ignores_name_case_and_extended_rcode():
    q = query("Known.EXAMPLE.", use_edns=0)
    r = answer(q, dns.rcode.BADVERS)   # an extended rcode, carried in the OPT record
    _, msgs = run("udp", [(REQ, q.to_wire()), (RESP, r.to_wire())])
    assert msgs[0].key == msgs[1].key
    assert (msgs[1].status, msgs[1].error) == ("BADVERS", True)


def test_tcp_length_prefix_split_and_coalesced():
    qs = [query(f"n{i}.example.") for i in range(5)]
    reqs = b"".join(tcp(q) for q in qs)
    resps = b"".join(tcp(answer(q, n=i)) for i, q in enumerate(qs))
    ref = view(run("tcp", [(REQ, reqs), (RESP, resps)])[1])
    assert len(ref) == 10
    for cut in range(1, 40):                     # inside the length prefix and the header
        chunks = [(REQ, reqs[:cut]), (REQ, reqs[cut:]), (RESP, resps[:cut]),
                  (RESP, resps[cut:])]
        assert view(run("tcp", chunks)[1]) == ref
    one = [(REQ, reqs[i:i + 1]) for i in range(len(reqs))]
    assert view(run("tcp", one + [(RESP, resps)])[1]) == ref


def test_big_answers_cut_by_the_capture():
    q = query("big.example.", "TXT")
    r = answer(q, n=60, rdtype="TXT")
    wire = r.to_wire()
    assert len(wire) > CAP
    # UDP: the datagram is cut; header and question still give the span.
    p, msgs = run("udp", [(REQ, q.to_wire()), (RESP, wire), (REQ, query().to_wire())],
                  cap=CAP)
    assert p.errors == 0
    assert pairs(msgs[:2]) == [("TXT big.example.", "NOERROR", False, 60)]
    assert msgs[1].attributes["deeptrace.incomplete"] is True and msgs[1].size == len(wire)
    assert msgs[2].operation == "A known.example."
    # TCP: the rest is stepped over, and the next message is found after it.
    q2 = query("after.example.")
    p, msgs = run("tcp", [(REQ, tcp(q) + tcp(q2)), (RESP, tcp(r)), (RESP, tcp(answer(q2)))],
                  cap=CAP)
    assert p.errors == 0
    assert pairs(msgs) == [("TXT big.example.", "NOERROR", False, 60),
                           ("A after.example.", "NOERROR", False, 1)]


def test_real_dnspython_queries_over_udp_and_tcp():
    """dnspython's own query functions against an in-test server; the server records
    what it received and sent, as the probe would on its sockets."""
    records = []
    us = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    us.bind(("127.0.0.1", 0))
    port = us.getsockname()[1]
    ts = socket.create_server(("127.0.0.1", port))

    def reply(wire):
        q = dns.message.from_wire(wire)
        known = q.question[0].name.to_text() == "known.example."
        return answer(q, dns.rcode.NOERROR if known else dns.rcode.NXDOMAIN).to_wire()

    def udp_server():
        for _ in range(2):
            data, addr = us.recvfrom(65535)
            records.append(("udp", REQ, data))
            out = reply(data)
            records.append(("udp", RESP, out))
            us.sendto(out, addr)

    def tcp_server():
        c, _ = ts.accept()
        buf = b""
        while len(buf) < 2 or len(buf) < 2 + int.from_bytes(buf[:2], "big"):
            chunk = c.recv(65535)
            records.append(("tcp", REQ, chunk))
            buf += chunk
        out = reply(buf[2:])
        out = len(out).to_bytes(2, "big") + out
        records.append(("tcp", RESP, out))
        c.sendall(out)
        c.close()

    threads = [threading.Thread(target=f, daemon=True) for f in (udp_server, tcp_server)]
    for t in threads:
        t.start()
    dns.query.udp(query(), "127.0.0.1", port=port, timeout=5)
    dns.query.udp(query("missing.example."), "127.0.0.1", port=port, timeout=5)
    dns.query.tcp(query(), "127.0.0.1", port=port, timeout=5)
    for t in threads:
        t.join(5)
    us.close()
    ts.close()
    got = []
    for l4 in ("udp", "tcp"):
        p, msgs = run(l4, [(s, d) for k, s, d in records if k == l4])
        assert p.errors == 0
        got += [(l4,) + x[:3] for x in pairs(msgs)]
        first = next(d for k, s, d in records if k == l4)
        assert detect(first, 40000, 53, l4) == REQUEST
    assert sorted(got) == [("tcp", "A known.example.", "NOERROR", False),
                           ("udp", "A known.example.", "NOERROR", False),
                           ("udp", "A missing.example.", "NXDOMAIN", True)]


def test_tcp_first_message_without_its_length():
    """A server that reads the 2-byte length in a syscall of its own: the connection is
    recognised on the body, so the first message arrives without its prefix."""
    q1, q2 = query(), query("second.example.")
    r1, r2 = answer(q1), answer(q2)
    chunks = [(REQ, q1.to_wire()), (RESP, tcp(r1)), (REQ, tcp(q2)[:2]), (REQ, q2.to_wire()),
              (RESP, tcp(r2))]
    p, msgs = run("tcp", chunks)
    assert p.errors == 0
    assert pairs(msgs) == [("A known.example.", "NOERROR", False, 1),
                           ("A second.example.", "NOERROR", False, 1)]
    assert msgs[0].size == len(q1.to_wire())


def test_garbage_and_truncation():
    p = parser("udp")
    assert p.feed(REQ, b"\x00\x01garbage", 9, 1, 2) == [] and p.errors == 1
    assert p.feed(REQ, b"\x12\x34" + b"\xff" * 30, 32, 1, 2) == [] and p.errors == 2
    assert p.feed(REQ, query().to_wire(), len(query().to_wire()), 3, 4)[0].operation == \
        "A known.example."
    p = parser("tcp")
    assert p.feed(REQ, b"\x00\x05hello", 7, 1, 2) == [] and p.errors == 0   # too short to say
    p = parser("tcp")
    assert p.feed(REQ, b"\x00\x05hello world!", 14, 1, 2) == [] and p.errors == 1
    w = tcp(query())
    assert p.feed(REQ, w[:10], 10, 3, 4) == []          # waits for the rest
    assert p.feed(REQ, w[10:], len(w) - 10, 5, 6)[0].ts_start == 3
    assert len(p.streams[REQ]) == 0
    # A hole over the length prefix: nothing to frame; resync at the next syscall.
    p = parser("tcp")
    assert p.feed(REQ, b"\x00", 40, 1, 2) == [] and p.errors == 1
    assert len(p.feed(REQ, w, len(w), 3, 4)) == 1


def test_non_query_opcodes_and_no_question():
    q = dns.message.make_query("zone.example.", "SOA")
    q.set_opcode(dns.opcode.NOTIFY)
    r = dns.message.make_response(q)
    empty = dns.message.Message(id=7)
    empty.flags |= dns.flags.QR
    empty.set_rcode(dns.rcode.FORMERR)
    _, msgs = run("udp", [(REQ, q.to_wire()), (RESP, r.to_wire()), (RESP, empty.to_wire())])
    assert [m.operation for m in msgs] == ["NOTIFY zone.example."] * 2 + ["QUERY"]
    assert msgs[2].key == (7, None, None) and msgs[2].status == "FORMERR"


# -- properties -------------------------------------------------------------------------
names = st.from_regex(r"\A[a-z0-9]{1,12}(\.[a-z0-9]{1,12}){0,3}\.\Z")
msgs_st = st.tuples(names, st.sampled_from(["A", "AAAA", "TXT", "MX"]), st.integers(0, 5),
                    st.sampled_from([0, 2, 3])).map(
    lambda t: [query(t[0], t[1]), t[2], t[3]])


def wires(specs):
    reqs, resps = [], []
    for q, n, rcode in specs:
        reqs.append(q.to_wire())
        resps.append(answer(q, rcode, n=n if q.question[0].rdtype in (1, 16) else 0,
                            rdtype="A" if q.question[0].rdtype == 1 else "TXT").to_wire())
    return reqs, resps


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(msgs_st, min_size=1, max_size=5), st.lists(st.integers(0, 600), max_size=10))
def test_property_tcp_any_split_gives_the_same_messages(specs, cuts):
    reqs, resps = wires(specs)
    req = b"".join(len(w).to_bytes(2, "big") + w for w in reqs)
    resp = b"".join(len(w).to_bytes(2, "big") + w for w in resps)
    ref = view(run("tcp", [(REQ, req), (RESP, resp)])[1])
    assert len(ref) == 2 * len(specs)
    assert view(run("udp", [(REQ, w) for w in reqs] + [(RESP, w) for w in resps])[1]) == ref
    chunks = [(REQ, c) for c in kit.split(req, cuts)] + [(RESP, c) for c in kit.split(resp, cuts)]
    assert view(run("tcp", chunks)[1]) == ref


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.sampled_from(["udp", "tcp"]),
       kit.syscalls(st.one_of(st.binary(max_size=80), msgs_st.map(lambda s: s[0].to_wire()),
                              msgs_st.map(lambda s: tcp(s[0])), st.just(b"\xff\xff"))))
def test_property_random_bytes_never_raise_and_stay_bounded(l4, feeds):
    p = parser(l4)
    p.streams[REQ].cap = p.streams[RESP].cap = 4096
    list(kit.feed_each(p, feeds))   # checks the streams' bounds after each feed


# -- detector ---------------------------------------------------------------------------
Q = query().to_wire()
QE = query(use_edns=0).to_wire()
R = answer(query()).to_wire()
NX = answer(query("missing.example."), dns.rcode.NXDOMAIN).to_wire()

POSITIVE = [(Q, 40000, 53, "udp", REQUEST), (QE, 40000, 53, "udp", REQUEST),
            (R, 53, 40000, "udp", RESPONSE), (NX, 40000, 53, "udp", RESPONSE),
            (tcp(query()), 40000, 53, "tcp", REQUEST),
            (tcp(answer(query())), 53, 1, "tcp", RESPONSE),
            (Q, 40000, 53, "tcp", REQUEST),               # its length went separately
            (R, 53, 40000, "tcp", RESPONSE),
            # Elsewhere than port 53, strict queries only.
            (Q, 40000, 5353, "udp", REQUEST), (QE, 40000, 9999, "udp", REQUEST),
            (tcp(query()), 40000, 9999, "tcp", REQUEST), (Q, 9999, 40000, "tcp", REQUEST)]
NEGATIVE = [(R, 9999, 40000, "udp", 0),                                   # a response
            (len(R).to_bytes(2, "big") + R, 9999, 40000, "tcp", 0),
            (Q[:2] + b"\x05" + Q[3:], 1, 9999, "udp", 0),                 # AA and RD set
            (Q[:3] + b"\x80" + Q[4:], 1, 9999, "udp", 0),                 # RA set
            (query(".", "NS").to_wire(), 1, 9999, "udp", 0),              # the root name
            (tcp(query()), 40000, 53, "udp", 0), (Q[:12], 1, 53, "udp", 0),
            (R[:2] + b"\x28" + R[3:], 53, 1, "udp", 0),                   # opcode UPDATE
            (Q[:5] + b"\x02" + Q[6:], 1, 53, "udp", 0),                   # two questions
            (Q[:7] + b"\x01" + Q[8:], 1, 53, "udp", 0),                   # a query with answers
            (b"\x00\x05hello", 1, 53, "tcp", 0), (b"", 1, 53, "udp", 0),
            (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 1, 53, "tcp", 0),
            (Q[:12] + b"\x40" + Q[13:], 1, 53, "udp", 0),                  # label length 64
            (b"\x00\x00\x00\x2a\x01\x00\x00\x00\x00\x00\x00\x00\xd4\x07\x00\x00" + bytes(16),
             1, 27017, "tcp", 0)]                                          # MongoDB-like


# Found by tests/test_detectors.py, which runs the kit's DetectorSuite on it.
detect_cases = kit.DetectCases(DnsProtocol, [(d, lp, rp, w, l4) for d, lp, rp, l4, w in POSITIVE],
                               [(d, lp, rp, w, l4) for d, lp, rp, l4, w in NEGATIVE],
                               ports=(53,))


def test_protocol_class():
    p = DnsProtocol(DnsProtocol.config_class()).parser()
    assert isinstance(p, DnsParser) and p.l4 == "udp"
