"""MySQL / MariaDB protocol plugin: the parser on real captured bytes (split, coalesced,
pipelined, with holes, garbage and truncation), hypothesis properties, and the detector
in Python and in the kernel.

The captures were recorded once through a small recording TCP proxy between PyMySQL 1.1
and MariaDB 10.11 (each tuple is one recv() of the proxy: "c" client to server, "s" server
to client). Scenarios "a_*" use PyMySQL's default capabilities (legacy EOF packets);
"b_*" add CLIENT_DEPRECATE_EOF, so result sets end with an OK packet with a 0xfe header.
PyMySQL has no server-side prepared statements: COM_STMT_PREPARE / EXECUTE / CLOSE were
written as raw packets on its socket after the handshake. In the hex, "*" stands for 3000
bytes of "x" (0x78), the value of the one big row.
"""

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deeptrace_core import testing as kit
from deeptrace_core.l7 import REQ, REQUEST, RESP, RESPONSE
from deeptrace_plugins.protocols.mysql.parser import MySQLParser
from deeptrace_plugins.protocols.mysql.plugin import MySQLProtocol
from deeptrace_plugins.protocols.sql import first_keyword, redact

# What both scenarios' handshakes end with: the server's OK to the login, then PyMySQL's
# SET NAMES and SET AUTOCOMMIT, each answered with an OK.
AFTER_LOGIN = [
    ("s", "0700000200000002000000"),
    ("c", "1200000003534554204e414d455320757466386d6234"),
    ("s", "0700000100000002000000"),
    ("c", "1300000003534554204155544f434f4d4d4954203d2030"),
    ("s", "0700000100000000000000"),
]

MYSQL = {
    "a_handshake": [
        ("s", "640000000a352e352e352d31302e31312e31392d4d6172696144422d302b6465623132753100"
               "060000002d2570266a64372600fef72d0200ff81150000000000001d000000545940713d7a70"
               "423a3c5d41006d7973716c5f6e61746976655f70617373776f726400"),
        ("c", "8b0000010da23b00ffffff002d00000000000000000000000000000000000000000000006170"
               "700014e25b8dfe9e109455f06dccce717e83478618f55773686f70006d7973716c5f6e617469"
               "76655f70617373776f726400360c5f636c69656e745f6e616d650770796d7973716c0f5f636c"
               "69656e745f76657273696f6e05312e322e34045f706964053130373135"),
        *AFTER_LOGIN,
    ],
    "a_create": [
        ("c", "6600000003435245415445205441424c45204946204e4f5420455849535453206974656d7320"
               "28696420494e54205052494d415259204b4559204155544f5f494e4352454d454e542c206e61"
               "6d65205641524348415228313030292c20707269636520444f55424c4529"),
        ("s", "0700000100000000000000"),
    ],
    "a_truncate": [
        ("c", "15000000035452554e43415445205441424c45206974656d73"),
        ("s", "0700000100000000000000"),
    ],
    "a_insert": [
        ("c", "5100000003494e5345525420494e544f206974656d7320286e616d652c207072696365292056"
               "414c5545532028276170706c65272c20312e35292c20282770656172272c20322e3235292c20"
               "284e554c4c2c203329"),
        ("s", "2e00000100030101000000265265636f7264733a203320204475706c6963617465733a203020"
               "205761726e696e67733a2030"),
    ],
    "a_select": [
        ("c", "2e0000000353454c4543542069642c206e616d652c2070726963652046524f4d206974656d73"
               "204f52444552204259206964"),
        ("s", "010000010328000002036465660473686f70056974656d73056974656d730269640269640c3f"
               "000b0000000303420000002c000003036465660473686f70056974656d73056974656d73046e"
               "616d65046e616d650c2d0090010000fd00000000002e000004036465660473686f7005697465"
               "6d73056974656d730570726963650570726963650c3f00160000000500001f000005000005fe"
               "000021000c0000060131056170706c6503312e350c0000070132047065617204322e32350500"
               "00080133fb013305000009fe00002100"),
    ],
    "a_empty": [
        ("c", "220000000353454c4543542069642046524f4d206974656d73205748455245206964203c2030"),
        ("s", "010000010128000002036465660473686f70056974656d73056974656d730269640269640c3f"
               "000b00000003034200000005000003fe0000010005000004fe00000100"),
    ],
    "a_error": [
        ("c", "150000000353454c454354202a2046524f4d206e6f73756368"),
        ("s", "2a000001ff7a042334325330325461626c65202773686f702e6e6f737563682720646f65736e"
               "2774206578697374"),
    ],
    "a_password": [
        ("c", "2c00000003414c544552205553455220276170702740272527204944454e5449464945442042"
               "59202773336372657427"),
        ("s", "0700000100000000000000"),
    ],
    "a_multi": [
        ("c", "4a0000000353454c45435420313b20555044415445206974656d732053455420707269636520"
               "3d2034205748455245206964203d20313b2053454c454354206e616d652046524f4d20697465"
               "6d73"),
        ("s", "010000010117000002036465660000000131000c3f000100000003810000000005000003fe00"
               "00080002000004013105000005fe00000800300000060001000900000028526f7773206d6174"
               "636865643a203120204368616e6765643a203120205761726e696e67733a203001000007012c"
               "000008036465660473686f70056974656d73056974656d73046e616d65046e616d650c2d0090"
               "010000fd000000000005000009fe000021000600000a056170706c650500000b047065617201"
               "00000cfb0500000dfe00002100"),
    ],
    "a_big": [
        ("c", "280000000353454c45435420524550454154282778272c203330303029204153206269672c20"
               "37204153206e"),
        ("s", "0100000102190000020364656600000003626967000c2d00e02e0000fd000027000017000003"
               "03646566000000016e000c3f000100000003810000000005000004fe00000100bd0b0005fcb8"
               "0b*013705000006fe00000100"),
    ],
    "a_ping": [
        ("c", "010000000e"),
        ("s", "0700000100000001000000"),
    ],
    "a_initdb": [
        ("c", "06000000026d7973716c"),
        ("s", "0700000100000001000000"),
        ("c", "050000000273686f70"),
        ("s", "0700000100000001000000"),
    ],
    "a_prepare": [
        ("c", "390000001653454c454354206e616d652c2070726963652046524f4d206974656d7320574845"
               "5245206964203d203f20414e44207072696365203e203f"),
        ("s", "0c0000010001000000020002000000001700000203646566000000013f000c3f000000000006"
               "80000000001700000303646566000000013f000c3f000000000006800000000005000004fe00"
               "0001002c000005036465660473686f70056974656d73056974656d73046e616d65046e616d65"
               "0c2d0090010000fd00000000002e000006036465660473686f70056974656d73056974656d73"
               "0570726963650570726963650c3f00160000000500001f000005000007fe00000100"),
    ],
    "a_execute": [
        ("c", "20000000170100000000010000000001080005000100000000000000000000000000e03f"),
        ("s", "01000001022c000002036465660473686f70056974656d73056974656d73046e616d65046e61"
               "6d650c2d0090010000fd00000000002e000003036465660473686f70056974656d7305697465"
               "6d730570726963650570726963650c3f00160000000500001f000005000004fe000001001000"
               "00050000056170706c65000000000000104005000006fe00000100"),
    ],
    "a_prepare_insert": [
        ("c", "2400000016494e5345525420494e544f206974656d7320286e616d65292056414c5545532028"
               "3f29"),
        ("s", "0c0000010002000000000001000000001700000203646566000000013f000c3f000000000006"
               "800000000005000003fe00000100"),
    ],
    "a_execute_insert": [
        ("c", "13000000170200000000010000000001fe00046b697769"),
        ("s", "0700000100010401000000"),
    ],
    "a_prepare_error": [
        ("c", "0f0000001653454c454b54206e6f7468696e67"),
        ("s", "ab000001ff2804233432303030596f75206861766520616e206572726f7220696e20796f7572"
               "2053514c2073796e7461783b20636865636b20746865206d616e75616c207468617420636f72"
               "726573706f6e647320746f20796f7572204d617269614442207365727665722076657273696f"
               "6e20666f72207468652072696768742073796e74617820746f20757365206e65617220275345"
               "4c454b54206e6f7468696e6727206174206c696e652031"),
    ],
    "a_close_stmt": [
        ("c", "050000001901000000"),
    ],
    "a_quit": [
        ("c", "0100000001"),
    ],
    "b_handshake": [
        ("s", "640000000a352e352e352d31302e31312e31392d4d6172696144422d302b6465623132753100"
               "070000006b2d3d28513e222f00fef72d0200ff81150000000000001d000000642c4b742b7221"
               "492c3f3a42006d7973716c5f6e61746976655f70617373776f726400"),
        ("c", "8b0000010da23b01ffffff002d00000000000000000000000000000000000000000000006170"
               "7000148eb90543a6a02fcb47f16d5b2f189e53a42d905a73686f70006d7973716c5f6e617469"
               "76655f70617373776f726400360c5f636c69656e745f6e616d650770796d7973716c0f5f636c"
               "69656e745f76657273696f6e05312e322e34045f706964053130373135"),
        *AFTER_LOGIN,
    ],
    "b_select": [
        ("c", "270000000353454c4543542069642c206e616d652046524f4d206974656d73204f5244455220"
               "4259206964"),
        ("s", "010000010228000002036465660473686f70056974656d73056974656d730269640269640c3f"
               "000b0000000303420000002c000003036465660473686f70056974656d73056974656d73046e"
               "616d65046e616d650c2d0090010000fd0000000000080000040131056170706c650700000501"
               "320470656172030000060133fb07000007fe000021000000"),
    ],
    "b_empty": [
        ("c", "220000000353454c4543542069642046524f4d206974656d73205748455245206964203c2030"),
        ("s", "010000010128000002036465660473686f70056974656d73056974656d730269640269640c3f"
               "000b00000003034200000007000003fe000001000000"),
    ],
    "b_multi": [
        ("c", "130000000353454c45435420313b2053454c4543542032"),
        ("s", "010000010117000002036465660000000131000c3f0001000000038100000000020000030131"
               "07000004fe000009000000010000050117000006036465660000000132000c3f000100000003"
               "810000000002000007013207000008fe000001000000"),
    ],
    "b_prepare": [
        ("c", "240000001653454c454354206e616d652046524f4d206974656d73205748455245206964203d"
               "203f"),
        ("s", "0c0000010004000000010001000000001700000203646566000000013f000c3f000000000006"
               "80000000002c000003036465660473686f70056974656d73056974656d73046e616d65046e61"
               "6d650c2d0090010000fd0000000000"),
    ],
    "b_execute": [
        ("c", "1600000017040000000001000000000108000200000000000000"),
        ("s", "01000001012c000002036465660473686f70056974656d73056974656d73046e616d65046e61"
               "6d650c2d0090010000fd0000000000070000030000047065617207000004fe000001000000"),
    ],
    "b_quit": [
        ("c", "0100000001"),
    ],
}


A = [k for k in MYSQL if k.startswith("a_")]
B = [k for k in MYSQL if k.startswith("b_")]


def chunks(names):
    """The recorded recv() chunks of the scenarios, in order: (side, bytes)."""
    return [(REQ if side == "c" else RESP, bytes.fromhex(h.replace("*", "78" * 3000)))
            for name in names for side, h in MYSQL[name]]


def feed_all(parser, items):
    """Feed (side, data[, nbytes]) items with ts = index; all messages emitted."""
    return kit.feed(parser, items, tick=1, span=0)


def view(m):
    return kit.view([m], ("is_request", "operation", "status", "error", "expects_response",
                          "attributes", "size", "ts_start", "ts_end"))[0]


def pkt(seq, payload):
    return struct.pack("<I", len(payload))[:3] + bytes([seq]) + payload




# -- real captures ------------------------------------------------------------------------

def test_legacy_eof_capture_every_command():
    p = MySQLProtocol().parser()
    got = [(q.operation, q.attributes.get("db.mysql.command"), r and r.status)
           for q, r in kit.pairs(feed_all(p, chunks(A)))]
    assert got == [
        ("SET", "QUERY", "OK"), ("SET", "QUERY", "OK"),       # PyMySQL's set-up after auth
        ("CREATE", "QUERY", "OK"), ("TRUNCATE", "QUERY", "OK"), ("INSERT", "QUERY", "OK"),
        ("SELECT", "QUERY", "OK"), ("SELECT", "QUERY", "OK"), ("SELECT", "QUERY", "1146"),
        ("ALTER", "QUERY", "OK"), ("SELECT", "QUERY", "OK"), ("SELECT", "QUERY", "OK"),
        ("PING", "PING", "OK"), ("INIT_DB", "INIT_DB", "OK"), ("INIT_DB", "INIT_DB", "OK"),
        ("SELECT", "STMT_PREPARE", "OK"), ("SELECT", "STMT_EXECUTE", "OK"),
        ("INSERT", "STMT_PREPARE", "OK"), ("INSERT", "STMT_EXECUTE", "OK"),
        ("SELEKT", "STMT_PREPARE", "1064"), ("STMT_CLOSE", "STMT_CLOSE", None),
        ("QUIT", "QUIT", None)]
    assert p.errors == 0 and not p.pending and p.reply is None
    assert p.deprecate_eof is False          # learned from the handshake


def test_legacy_eof_capture_details():
    msgs = feed_all(MySQLProtocol().parser(), chunks(A))
    by = {}
    for q, r in kit.pairs(msgs):
        by.setdefault(q.attributes.get("db.query.text", q.operation), []).append((q, r))
    q, r = by["SELECT id, name, price FROM items ORDER BY id"][0]
    assert q.attributes["db.system"] == "mysql" and q.attributes["db.namespace"] == "shop"
    assert q.attributes["db.operation.name"] == "SELECT"
    assert r.attributes["db.response.returned_rows"] == 3 and not r.error
    assert r.size == 206 and q.size == 50
    q, r = by["SELECT id FROM items WHERE id < 0"][0]
    assert r.attributes["db.response.returned_rows"] == 0
    q, r = by["SELECT * FROM nosuch"][0]
    assert r.error and r.status == "1146"
    assert r.attributes["db.response.status_code"] == "1146"
    assert r.attributes["db.mysql.sqlstate"] == "42S02"
    assert r.attributes["error.message"] == "Table 'shop.nosuch' doesn't exist"
    q, r = by["INSERT INTO items (name, price) VALUES ('apple', 1.5), ('pear', 2.25), (NULL, 3)"][0]
    assert r.attributes["db.response.affected_rows"] == 3
    # multi statements: SELECT, UPDATE, SELECT answered by one response (MORE_RESULTS)
    q, r = by["SELECT 1; UPDATE items SET price = 4 WHERE id = 1; SELECT name FROM items"][0]
    assert r.attributes["db.response.returned_rows"] == 4
    assert r.attributes["db.response.affected_rows"] == 1 and r.size == 203
    q, r = by["SELECT REPEAT('x', 3000) AS big, 7 AS n"][0]
    assert r.attributes["db.response.returned_rows"] == 1 and r.size == 3088
    # the password never appears; the statement is redacted
    assert "ALTER USER 'app'@'%' IDENTIFIED BY '?'" in by
    assert not any("s3cret" in str(m.attributes) for m in msgs)
    # prepared statements: the text comes back by statement id
    prep = by["SELECT name, price FROM items WHERE id = ? AND price > ?"]
    (pq, pr), (eq, er), (cq, cr) = prep
    assert pq.attributes["db.mysql.command"] == "STMT_PREPARE"
    assert pq.attributes["db.mysql.statement_id"] == 1 and pr.status == "OK"
    assert eq.attributes["db.mysql.command"] == "STMT_EXECUTE" and eq.operation == "SELECT"
    assert er.attributes["db.response.returned_rows"] == 1
    assert cq.operation == "STMT_CLOSE" and not cq.expects_response and cr is None
    (iq, ir), = [x for x in by["INSERT INTO items (name) VALUES (?)"]
                 if x[0].attributes["db.mysql.command"] == "STMT_EXECUTE"]
    assert ir.attributes["db.response.affected_rows"] == 1
    q, r = by["SELEKT nothing"][0]
    assert r.error and r.attributes["db.mysql.sqlstate"] == "42000"
    inits = [q.attributes["db.namespace"] for q, _ in by["INIT_DB"]]
    assert inits == ["mysql", "shop"]


def test_deprecate_eof_capture():
    p = MySQLProtocol().parser()
    got = [(q.operation, q.attributes.get("db.mysql.command"), r and r.status,
            r and r.attributes.get("db.response.returned_rows"), r and r.size)
           for q, r in kit.pairs(feed_all(p, chunks(B)))]
    assert got == [("SET", "QUERY", "OK", None, 11), ("SET", "QUERY", "OK", None, 11),
                   ("SELECT", "QUERY", "OK", 3, 138), ("SELECT", "QUERY", "OK", 0, 60),
                   ("SELECT", "QUERY", "OK", 2, 98), ("SELECT", "STMT_PREPARE", "OK", None, 91),
                   ("SELECT", "STMT_EXECUTE", "OK", 1, 75), ("QUIT", "QUIT", None, None, None)]
    assert p.deprecate_eof is True and p.errors == 0


@pytest.mark.parametrize("names", [A, B], ids=["legacy-eof", "deprecate-eof"])
def test_joined_mid_connection_without_handshake(names):
    """The agent started after the handshake: capabilities unknown, same messages."""
    full = [view(m) for m in feed_all(MySQLProtocol().parser(), chunks(names))]
    rest = [n for n in names if not n.endswith("handshake")]
    p = MySQLProtocol().parser()
    late = [view(m) for m in feed_all(p, chunks(rest))]

    def strip(v):                              # the schema comes from the handshake
        return v[:5] + (tuple(a for a in v[5] if a[0] != "db.namespace"),)
    assert [strip(v) for v in late] == [strip(v) for v in full[4:]]   # 4: PyMySQL's SETs
    assert p.errors == 0 and not p.pending


def test_prepare_ok_trailing_eof_arrives_late_with_unknown_capabilities():
    """Unknown capabilities and the final EOF in a later syscall: the reply ends at the
    last definition, and the late EOF (sequence id > 1) is skipped, not taken as a reply."""
    col = pkt(2, b"\x03def\x04shop\x05items\x05items\x02id\x02id\x0c?\0\x0b\0\0\0\x03\x03B\0\0\0")
    req = pkt(0, b"\x16SELECT id FROM items")
    resp = pkt(1, b"\x00" + struct.pack("<IHHxH", 7, 1, 0, 0)) + col    # 1 column, 0 params
    eof = pkt(3, b"\xfe\0\0\x02\0")
    p = MySQLParser()
    msgs = p.feed(REQ, req, len(req), 1, 1) + p.feed(RESP, resp, len(resp), 2, 2)
    assert [(m.is_request, m.status) for m in msgs] == [(True, None), (False, "OK")]
    q = pkt(0, b"\x03SELECT 2")
    ok = pkt(1, b"\x00\x00\x00\x02\x00\x00\x00")
    msgs = p.feed(RESP, eof, len(eof), 3, 3) + p.feed(REQ, q, len(q), 4, 4) + \
        p.feed(RESP, ok, len(ok), 5, 5)
    assert [(m.is_request, m.operation, m.status, m.ts_start) for m in msgs] == [
        (True, "SELECT", None, 4), (False, "SELECT", "OK", 5)]
    assert p.statements == {7: "SELECT id FROM items"} and p.errors == 0


def test_byte_by_byte_is_the_same_as_whole():
    whole = [view(m) for m in feed_all(MySQLParser(), chunks(A + B))]
    items = [(side, data[i:i + 1], 1, ts) for ts, (side, data) in enumerate(chunks(A + B))
             for i in range(len(data))]
    p = MySQLParser()
    out = []
    for side, b, n, ts in items:
        out += p.feed(side, b, n, ts, ts)
    assert [view(m) for m in out] == whole


def test_coalesced_and_pipelined():
    """Three commands in one write, then their three replies in one read."""
    cmds = [pkt(0, b"\x03SELECT 1"), pkt(0, b"\x0e"), pkt(0, b"\x03DELETE FROM t")]
    sel = (pkt(1, b"\x01") + pkt(2, b"\x03def\0\0\0\x011\0\x0c?\0\x01\0\0\0\x03\x81\0\0\0\0")
           + pkt(3, b"\xfe\0\0\x02\0") + pkt(4, b"\x011") + pkt(5, b"\xfe\0\0\x02\0"))
    replies = sel + pkt(1, b"\x00\x00\x00\x02\x00\x00\x00") + \
        pkt(1, b"\x00\x05\x00\x02\x00\x00\x00")
    p = MySQLParser()
    msgs = p.feed(REQ, b"".join(cmds), sum(map(len, cmds)), 1, 1)
    msgs += p.feed(RESP, replies, len(replies), 2, 2)
    got = [(q.operation, r.status, r.attributes) for q, r in kit.pairs(msgs)]
    assert got == [("SELECT", "OK", {"db.response.returned_rows": 1}), ("PING", "OK", {}),
                   ("DELETE", "OK", {"db.response.affected_rows": 5})]


# -- holes, garbage, truncation ----------------------------------------------------------

def test_hole_over_big_row_emits_incomplete_then_resyncs():
    """The 3088-byte reply captured to 1024 bytes: its EOF lies in the hole, so the reply
    is emitted incomplete (FIFO stays aligned) and the next command parses normally."""
    (s1, q), (s2, big) = chunks(["a_big"])
    items = [(s1, q), (s2, big[:1024], len(big))] + chunks(["a_ping"])
    p = MySQLParser()
    msgs = feed_all(p, items)
    (q1, r1), (q2, r2) = kit.pairs(msgs)
    assert q1.operation == "SELECT" and r1.attributes["deeptrace.incomplete"] is True
    assert r1.attributes["db.response.returned_rows"] == 1 and r1.status is None
    assert r1.size == len(big) and r1.ts_start == r1.ts_end == 1  # to the end of the read
    assert (q2.operation, r2.status) == ("PING", "OK")
    assert "deeptrace.incomplete" not in r2.attributes


def test_hole_inside_row_that_ends_with_the_syscall():
    """A row cut by the capture but ending with its syscall: the next syscall starts at a
    packet boundary, so the reply completes normally."""
    (s1, q), (s2, big) = chunks(["a_big"])
    cut = len(big) - 9                         # everything but the final EOF packet
    items = [(s1, q), (s2, big[:600], cut), (s2, big[cut:])]
    (q1, r1), = kit.pairs(feed_all(MySQLParser(), items))
    assert r1.status == "OK" and "deeptrace.incomplete" not in r1.attributes
    assert r1.size == len(big) and r1.attributes["db.response.returned_rows"] == 1


def test_hole_in_long_query_keeps_its_prefix():
    text = b"INSERT INTO t VALUES " + b",".join(b"(%d, 'IDENTIFIED BY')" % i for i in range(400))
    q = pkt(0, b"\x03" + text)
    ok = pkt(1, b"\x00\xfc\x90\x01\x00\x02\x00\x00\x00")
    p = MySQLParser()
    msgs = feed_all(p, [(REQ, q[:1024], len(q)), (RESP, ok)])
    (req, resp), = kit.pairs(msgs)
    assert req.operation == "INSERT" and req.size == len(q)
    assert req.attributes["db.query.text"].startswith("INSERT INTO t VALUES (0, ")
    assert resp.attributes["db.response.affected_rows"] == 400


def test_multi_packet_command_over_16_mib():
    """A payload of 0xffffff bytes continues in the next packet (sequence id 1): the
    continuation is not a command, the reply pairs with the one request."""
    first = pkt(0, b"\x03INSERT INTO blobs VALUES ('")[:4]
    first = b"\xff\xff\xff\x00" + b"\x03INSERT INTO blobs VALUES ('" + b"a" * 990
    tail = pkt(1, b"a" * 10 + b"')")
    ok = pkt(1, b"\x00\x01\x00\x02\x00\x00\x00")
    p = MySQLParser()
    msgs = feed_all(p, [(REQ, first, 4 + 0xffffff), (REQ, tail), (RESP, ok)])
    (req, resp), = kit.pairs(msgs)
    assert req.operation == "INSERT" and resp.status == "OK" and p.errors == 0


def test_local_infile_round_trip():
    q = pkt(0, b"\x03LOAD DATA LOCAL INFILE '/tmp/x.csv' INTO TABLE t")
    want = pkt(1, b"\xfb/tmp/x.csv")
    data = pkt(2, b"1,a\n2,b\n") + pkt(3, b"")
    ok = pkt(4, b"\x00\x02\x00\x02\x00\x00\x00")
    msgs = feed_all(MySQLParser(), [(REQ, q), (RESP, want), (REQ, data), (RESP, ok)])
    (req, resp), = kit.pairs(msgs)
    assert req.operation == "LOAD" and resp.attributes["db.response.affected_rows"] == 2


def test_field_list_statistics_change_user_and_progress_report():
    p = MySQLParser()
    col = pkt(1, b"\x03def\x04shop\x05items\x05items\x02id\x02id\x0c?\0\x0b\0\0\0\x03\x03B\0\0\0")
    items = [(REQ, pkt(0, b"\x04items\0")), (RESP, col + pkt(2, b"\xfe\0\0\x02\0")),
             (REQ, pkt(0, b"\x09")), (RESP, pkt(1, b"Uptime: 10  Threads: 1")),
             (REQ, pkt(0, b"\x11app\0\x14" + b"S" * 20 + b"shop\0")),
             (RESP, pkt(1, b"\xfemysql_native_password\0" + b"n" * 20)),   # auth switch
             (REQ, pkt(2, b"P" * 20)), (RESP, pkt(3, b"\x00\0\0\x02\0\0\0")),
             (REQ, pkt(0, b"\x03ALTER TABLE t ADD c INT")),
             (RESP, pkt(1, b"\xff\xff\xff\x01\x01\x02\0\x10\0\x05stage")),   # progress
             (RESP, pkt(2, b"\x00\0\0\x02\0\0\0"))]
    msgs = feed_all(p, items)
    got = [(q.operation, r.status) for q, r in kit.pairs(msgs)]
    assert got == [("FIELD_LIST", "OK"), ("STATISTICS", "OK"), ("CHANGE_USER", "OK"),
                   ("ALTER", "OK")]
    assert not any("S" * 20 in str(m.attributes) or "P" * 20 in str(m.attributes) for m in msgs)


def test_execute_with_cursor_then_fetch():
    """COM_STMT_EXECUTE opening a read-only cursor gets only the column definitions (the
    EOF says SERVER_STATUS_CURSOR_EXISTS); COM_STMT_FETCH then reads rows to an EOF."""
    col = pkt(2, b"\x03def\x04shop\x05items\x05items\x02id\x02id\x0c?\0\x0b\0\0\0\x03\x03B\0\0\0")
    items = [(REQ, pkt(0, b"\x17" + struct.pack("<IBI", 3, 1, 1))),
             (RESP, pkt(1, b"\x01") + col + pkt(3, b"\xfe\0\0\x42\0")),
             (REQ, pkt(0, b"\x1c" + struct.pack("<II", 3, 2))),
             (RESP, pkt(1, b"\x00\x00\x01\0\0\0") + pkt(2, b"\x00\x00\x02\0\0\0") +
              pkt(3, b"\xfe\0\0\x42\0"))]
    msgs = feed_all(MySQLParser(), items)
    got = [(q.operation, r.status, r.attributes) for q, r in kit.pairs(msgs)]
    assert got == [("STMT_EXECUTE", "OK", {"db.response.returned_rows": 0}),
                   ("STMT_FETCH", "OK", {"db.response.returned_rows": 2})]


def test_ssl_request_stops_parsing():
    greeting = bytes.fromhex(MYSQL["a_handshake"][0][1])
    ssl = pkt(1, struct.pack("<IIB", 0x0aa20d | 0x800, 1 << 24, 45) + bytes(23))
    p = MySQLParser()
    msgs = feed_all(p, [(RESP, greeting), (REQ, ssl), (REQ, b"\x16\x03\x01\x02\x00\x01" * 20),
                        (RESP, b"\x16\x03\x03\x00\x7a\x02" * 20), (REQ, pkt(0, b"\x03SELECT 1"))])
    assert msgs == [] and p.encrypted and p.errors == 0


def test_garbage_then_a_valid_command():
    p = MySQLParser()
    msgs = feed_all(p, [(REQ, b"\x05\x00\x00\x00\xeeGARBAGE GARBAGE"),
                        (RESP, b"\x00\x01\x02 random server bytes with no request"),
                        (REQ, pkt(0, b"\x03SELECT 1")), (RESP, pkt(1, b"\x00\0\0\x02\0\0\0"))])
    assert [(m.is_request, m.operation, m.status) for m in msgs] == [
        (True, "SELECT", None), (False, "SELECT", "OK")]
    assert p.errors == 1


def test_truncated_reply_waits_for_the_rest():
    (s1, q), (s2, sel) = chunks(["a_select"])
    p = MySQLParser()
    assert len(p.feed(s1, q, len(q), 1, 1)) == 1
    for cut in (3, 60, len(sel) - 1):
        p2 = MySQLParser()
        p2.feed(s1, q, len(q), 1, 1)
        assert p2.feed(s2, sel[:cut], cut, 2, 2) == []
        rest = p2.feed(s2, sel[cut:], len(sel) - cut, 3, 3)
        assert [(m.status, m.ts_start, m.ts_end, m.size) for m in rest] == [("OK", 2, 3, len(sel))]


def test_statement_table_is_bounded():
    p = MySQLParser(max_statements=50)
    for i in range(300):
        q = pkt(0, b"\x16SELECT %d" % i)
        ok = pkt(1, b"\x00" + struct.pack("<IHHxH", i + 1, 0, 0, 0))
        feed_all(p, [(REQ, q), (RESP, ok)])
    assert len(p.statements) == 50 and p.statements[300] == "SELECT 299"
    e = pkt(0, b"\x17" + struct.pack("<IBI", 300, 0, 1))
    assert p.feed(REQ, e, len(e), 9, 9)[0].attributes["db.query.text"] == "SELECT 299"
    e = pkt(0, b"\x17" + struct.pack("<IBI", 1, 0, 1))    # evicted: name only
    assert p.feed(REQ, e, len(e), 9, 9)[0].operation == "STMT_EXECUTE"


def test_pending_requests_are_bounded():
    p = MySQLParser()
    for i in range(3000):
        p.feed(REQ, pkt(0, b"\x0e"), 5, i, i)
    assert len(p.pending) <= 1024


def test_sql_helpers():
    assert first_keyword("  /* hint */ (select 1)") == "SELECT"
    assert first_keyword("-- c\n# d\nINSERT INTO t") == "INSERT"
    assert first_keyword("/*!40101 SET NAMES utf8 */") == "SET"
    assert first_keyword("") == "" and first_keyword("123") == ""
    assert redact("SET PASSWORD FOR 'u'@'h' = PASSWORD('x''y')") == \
        "SET PASSWORD FOR 'u'@'h' = PASSWORD('?')"
    assert redact("CREATE USER u IDENTIFIED WITH caching_sha2_password BY 'pw'") == \
        "CREATE USER u IDENTIFIED WITH caching_sha2_password BY '?'"
    assert redact("GRANT ALL TO u IDENTIFIED BY PASSWORD '*ABC'") == \
        "GRANT ALL TO u IDENTIFIED BY PASSWORD '?'"
    assert redact("ALTER USER u IDENTIFIED BY 'cut-by-the-capt") == "ALTER USER u IDENTIFIED BY '?'"
    assert redact("SELECT 'IDENTIFIED', password FROM t") == "SELECT 'IDENTIFIED', password FROM t"


# -- properties ---------------------------------------------------------------------------

VALID = chunks(A + B)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, 10_000), max_size=40))
def test_property_any_split_gives_the_same_messages(cuts):
    whole = [view(m) for m in feed_all(MySQLParser(), VALID)]
    assert [view(m) for m in kit.feed_split(MySQLParser(), VALID, cuts, tick=1, span=0)] == whole


@settings(max_examples=200, deadline=None)
@given(kit.syscalls(st.one_of(st.binary(max_size=300), kit.suffixes([d for _, d in VALID])),
                    max_size=30))
def test_property_random_bytes_never_raise_and_stay_bounded(feeds):
    p = MySQLParser(max_statements=20)
    for _ in kit.feed_each(p, feeds):
        assert len(p.statements) <= 20 and len(p.pending) <= 1024


def test_huge_feeds_stay_bounded():
    p = MySQLParser()
    blob = pkt(0, b"\x03SELECT '" + b"z" * 100_000)[:1024]
    for i in range(50):
        p.feed(REQ, blob, 1 << 22, i, i)          # 4 MiB moved, 1 KiB captured each time
        assert len(p.streams[REQ]) <= p.streams[REQ].cap


# -- detector -----------------------------------------------------------------------------

GREETING = bytes.fromhex(MYSQL["a_handshake"][0][1])
HANDSHAKE_RESPONSE = bytes.fromhex(MYSQL["a_handshake"][1][1])
POSITIVE = [
    (GREETING, 40000, 3306, RESPONSE),
    (GREETING, 50000, 7777, RESPONSE),
    (bytes.fromhex(MYSQL["b_select"][0][1]), 50000, 7777, REQUEST),
    (bytes.fromhex(MYSQL["a_prepare"][0][1]), 50000, 3306, REQUEST),
    (bytes.fromhex(MYSQL["a_execute"][0][1]), 50000, 3306, REQUEST),
    (bytes.fromhex(MYSQL["a_initdb"][0][1]), 50000, 3306, REQUEST),
    (pkt(0, b"\x03\x00\x01SELECT * FROM t"), 1234, 5678, REQUEST),   # query attributes
    (pkt(0, b"\x03/* app */ SELECT 1"), 1234, 5678, REQUEST),
    (pkt(0, b"\x03SELECT '" + b"v" * 3000)[:1024], 1234, 5678, REQUEST),  # capture cut
    (pkt(0, b"\x0e"), 50000, 3306, REQUEST),
    (pkt(0, b"\x01"), 3306, 50000, REQUEST),
    (pkt(0, b"\x19\x01\x00\x00\x00"), 50000, 3306, REQUEST),
    (b"\x4a\x00\x00\x00\x0a8.0.36\x00" + bytes(64), 50000, 3306, RESPONSE),
]
NEGATIVE = [
    (pkt(0, b"\x0e"), 50000, 7777, 0),                       # PING needs the port hint
    (pkt(0, b"\x19\x01\x00\x00\x00"), 50000, 7777, 0),
    (HANDSHAKE_RESPONSE, 50000, 3306, 0),                    # sequence id 1
    (pkt(0, b"\x03SELECT 1") + pkt(0, b"\x0e"), 50000, 3306, 0),   # length does not match
    (pkt(0, b"\x03\x01\x02\x03binary"), 50000, 3306, 0),
    (pkt(0, b"\x03SELECT 1"), 50000, 3306, 0, "udp"),
    (pkt(0, b"\x42whatever text"), 50000, 3306, 0),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 50000, 80, 0),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40), 50000, 3306, 0),
    (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", 50000, 5432, 0),
    (b"*1\r\n$4\r\nPING\r\n", 50000, 6379, 0),
    (b"\x03\x00\x00\x00\x03SELECT 1", 1, 2, 0),              # data beyond the packet
    (b"", 3306, 3306, 0),
    (b"\x01\x00\x00", 3306, 3306, 0),
]


# Found by tests/test_detectors.py, which runs the kit's DetectorSuite on it.
detect_cases = kit.DetectCases(
    MySQLProtocol, POSITIVE, NEGATIVE, ports=(3306,),
    inputs=st.builds(lambda n, s, c, rest: bytes([n, 0, 0, s, c]) + rest,
                     st.integers(0, 70), st.sampled_from([0, 1]),
                     st.sampled_from([0x01, 0x02, 0x03, 0x0a, 0x0e, 0x16, 0x17, 0x19]),
                     st.binary(max_size=59)))


def test_protocol_class():
    # (registration through the entry point: tests/test_detectors.py)
    assert isinstance(MySQLProtocol().parser(), MySQLParser)
    config = MySQLProtocol.config_class(max_statements=7)
    assert MySQLProtocol(config).parser().max_statements == 7
