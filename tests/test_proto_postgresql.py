"""PostgreSQL protocol plugin: the parser on real captured bytes (split, coalesced,
pipelined, with holes, garbage and truncation), hypothesis properties, and the detector
in Python and in the kernel.

The captures were recorded once through a small recording TCP proxy between psycopg 3.3
(libpq) and PostgreSQL 15 (each tuple is one recv() of the proxy: "c" client to server,
"s" server to client): SCRAM-SHA-256 start-up, simple and extended queries, an error,
server-side prepared statements (prepare=True), pipeline mode with one Sync and with
several Syncs (one failing), COPY FROM STDIN, LISTEN/NOTIFY, a NOTICE, a 3000-byte value,
an empty query and Terminate. In the hex, "*" stands for 3000 bytes of "x" (0x78).
"""

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deeptrace_core import testing as kit
from deeptrace_core.l7 import REQ, REQUEST, RESP, RESPONSE
from deeptrace_plugins.protocols.postgresql.parser import PostgreSQLParser
from deeptrace_plugins.protocols.postgresql.plugin import PostgreSQLProtocol

PG = {
    "handshake": [
        ("c", "000000200003000075736572006170700064617461626173650073686f700000"),
        ("s", "52000000170000000a534352414d2d5348412d3235360000"),
        ("c", "7000000036534352414d2d5348412d32353600000000206e2c2c6e3d2c723d5039553667316c"
               "2f6c385434585059666f416c514a4f7168"),
        ("s", "520000005c0000000b723d5039553667316c2f6c385434585059666f416c514a4f716876686f"
               "4167474e6d504a36364949386f5142663462746e452c733d3845536178424664654e71414f73"
               "495843594d6a41513d3d2c693d34303936"),
        ("c", "700000006c633d626977732c723d5039553667316c2f6c385434585059666f416c514a4f7168"
               "76686f4167474e6d504a36364949386f5142663462746e452c703d2b4d6c456a755041504f49"
               "334c67367333776735763675344739783148582b524d7236674d794f77526c303d"),
        ("s", "52000000360000000c763d566965696e423944367359414b526b704a714d753273306c6e6879"
               "6a61454b4f71572f4a744f6c462f61733d52000000080000000053000000166170706c696361"
               "74696f6e5f6e616d6500005300000019636c69656e745f656e636f64696e6700555446380053"
               "00000017446174655374796c650049534f2c204d445900530000002664656661756c745f7472"
               "616e73616374696f6e5f726561645f6f6e6c79006f6666005300000017696e5f686f745f7374"
               "616e646279006f6666005300000019696e74656765725f6461746574696d6573006f6e005300"
               "00001b496e74657276616c5374796c6500706f73746772657300530000001569735f73757065"
               "7275736572006f66660053000000197365727665725f656e636f64696e670055544638005300"
               "0000327365727665725f76657273696f6e0031352e3138202844656269616e2031352e31382d"
               "302b646562313275312900530000001e73657373696f6e5f617574686f72697a6174696f6e00"
               "6170700053000000237374616e646172645f636f6e666f726d696e675f737472696e6773006f"
               "6e00530000001554696d655a6f6e65004574632f555443004b0000000c00002a3b35fe836a5a"
               "0000000549"),
    ],
    "create": [
        ("c", "5100000056435245415445205441424c45204946204e4f5420455849535453206974656d7320"
               "2869642073657269616c205052494d415259204b45592c206e616d6520746578742c20707269"
               "636520666c6f6174382900"),
        ("s", "4300000011435245415445205441424c45005a0000000549"),
    ],
    "truncate": [
        ("c", "51000000245452554e43415445206974656d732052455354415254204944454e5449545900"),
        ("s", "43000000135452554e43415445205441424c45005a0000000549"),
    ],
    "insert": [
        ("c", "500000005100494e5345525420494e544f206974656d7320286e616d652c2070726963652920"
               "56414c554553202824312c202432292c202824332c2024342900000400000000000002bd0000"
               "0000000002bd420000003f0000000400000001000000010004000000056170706c6500000008"
               "3ff8000000000000000000047065617200000008400200000000000000010000440000000650"
               "00450000000900000000005300000004"),
        ("s", "310000000432000000046e00000004430000000f494e5345525420302032005a0000000549"),
    ],
    "select": [
        ("c", "500000004a0053454c4543542069642c206e616d652c2070726963652046524f4d206974656d"
               "73205748455245207072696365203e202431204f524445522042592069640000010000001542"
               "0000001600000001000100010000000200010001000044000000065000450000000900000000"
               "005300000004"),
        ("s", "31000000043200000004540000004a0003696400000040070001000000170004ffffffff0000"
               "6e616d650000004007000200000019ffffffffffff0000707269636500000040070003000002"
               "bd0008ffffffff0000440000001b00030000000131000000056170706c6500000003312e3544"
               "0000001b00030000000132000000047065617200000004322e3235430000000d53454c454354"
               "2032005a0000000549"),
    ],
    "error": [
        ("c", "510000001953454c454354202a2046524f4d206e6f7375636800"),
        ("s", "4500000069534552524f5200564552524f5200433432503031004d72656c6174696f6e20226e"
               "6f737563682220646f6573206e6f7420657869737400503135004670617273655f72656c6174"
               "696f6e2e63004c3133393200527061727365724f70656e5461626c650000"),
        ("s", "5a0000000549"),
    ],
    "simple": [
        ("c", "510000002253454c4543542031204153206f6e653b2053454c454354202774776f2700"),
        ("s", "540000001c00016f6e6500000000000000000000170004ffffffff0000440000000b00010000"
               "000131430000000d53454c454354203100540000002100013f636f6c756d6e3f000000000000"
               "0000000019ffffffffffff0000440000000d00010000000374776f430000000d53454c454354"
               "2031005a0000000549"),
    ],
    "password": [
        ("c", "5100000025414c54455220524f4c45206170702050415353574f524420277333637265742700"),
        ("s", "430000000f414c54455220524f4c45005a0000000549"),
    ],
    "prepare1": [
        ("c", "50000000365f7067335f300053454c454354206e616d652046524f4d206974656d7320574845"
               "5245206964203d202431000001000000155300000004"),
        ("s", "31000000045a0000000549"),
        ("c", "420000001c005f7067335f300000010001000100000002000100010000440000000650004500"
               "00000900000000005300000004"),
        ("s", "3200000004540000001d00016e616d650000004007000200000019ffffffffffff0000440000"
               "000f0001000000056170706c65430000000d53454c4543542031005a0000000549"),
    ],
    "prepare2": [
        ("c", "420000001c005f7067335f300000010001000100000002000200010000440000000650004500"
               "00000900000000005300000004"),
        ("s", "3200000004540000001d00016e616d650000004007000200000019ffffffffffff0000440000"
               "000e00010000000470656172430000000d53454c4543542031005a0000000549"),
    ],
    "pipeline": [
        ("c", "500000003f00494e5345525420494e544f206974656d7320286e616d652c2070726963652920"
               "56414c554553202824312c202432290000020000000000000015420000001e00000002000000"
               "0100020000000270300000000200000001000044000000065000450000000900000000005000"
               "00003f00494e5345525420494e544f206974656d7320286e616d652c20707269636529205641"
               "4c554553202824312c202432290000020000000000000015420000001e000000020000000100"
               "0200000002703100000002000100010000440000000650004500000009000000000050000000"
               "3f00494e5345525420494e544f206974656d7320286e616d652c207072696365292056414c55"
               "4553202824312c202432290000020000000000000015420000001e0000000200000001000200"
               "0000027032000000020002000100004400000006500045000000090000000000500000002200"
               "53454c45435420636f756e74282a292046524f4d206974656d73000000420000000e00000000"
               "000000010000440000000650004500000009000000000053000000044800000004"),
        ("s", "310000000432000000046e00000004430000000f494e53455254203020310031000000043200"
               "0000046e00000004430000000f494e534552542030203100310000000432000000046e000000"
               "04430000000f494e53455254203020310031000000043200000004540000001e0001636f756e"
               "7400000000000000000000140008ffffffff0000440000000b00010000000135430000000d53"
               "454c4543542031005a0000000549"),
    ],
    "pipeline_sync": [
        ("c", "500000003c00555044415445206974656d7320534554207072696365203d207072696365202b"
               "2031205748455245206964203d20243100000100000015420000001600000001000100010000"
               "00020001000100004400000006500045000000090000000000"),
        ("c", "5300000004"),
        ("s", "310000000432000000046e00000004430000000d5550444154452031005a0000000549"),
        ("c", "500000002d0044454c4554452046524f4d206974656d73205748455245206e616d65203d2024"
               "3100000100000000420000001600000001000000010000000270300001000044000000065000"
               "450000000900000000005300000004"),
        ("s", "310000000432000000046e00000004430000000d44454c4554452031005a0000000549"),
        ("c", "50000000120053454c45435420312f30000000420000000e0000000000000001000044000000"
               "06500045000000090000000000"),
        ("c", "53000000044800000004"),
        ("s", "31000000044500000041534552524f5200564552524f5200433232303132004d646976697369"
               "6f6e206279207a65726f0046696e742e63004c3836390052696e74346469760000"),
        ("s", "5a0000000549"),
    ],
    "copy": [
        ("c", "5100000028434f5059206974656d7320286e616d652c207072696365292046524f4d20535444"
               "494e00"),
        ("s", "470000000b00000200000000"),
        ("c", "6400000012633109312e300a633209322e300a6300000004"),
        ("s", "430000000b434f50592032005a0000000549"),
    ],
    "listen": [
        ("c", "51000000104c495354454e206368616e00"),
        ("s", "430000000b4c495354454e005a0000000549"),
        ("c", "51000000194e4f54494659206368616e2c202768656c6c6f2700"),
        ("s", "430000000b4e4f5449465900410000001300002a3b6368616e0068656c6c6f005a0000000549"),
    ],
    "notice": [
        ("c", "5100000031444f20242420424547494e205241495345204e4f5449434520276e6f7465202527"
               "2c20313b20454e4420242400"),
        ("s", "4e0000007b534e4f5449434500564e4f5449434500433030303030004d6e6f74652031005750"
               "4c2f706753514c2066756e6374696f6e20696e6c696e655f636f64655f626c6f636b206c696e"
               "6520312061742052414953450046706c5f657865632e63004c333839310052657865635f7374"
               "6d745f72616973650000"),
        ("s", "4300000007444f005a0000000549"),
    ],
    "big": [
        ("c", "510000002c53454c45435420726570656174282778272c203330303029204153206269672c20"
               "37204153206e00"),
        ("s", "540000003000026269670000000000000000000019ffffffffffff00006e0000000000000000"
               "0000170004ffffffff00004400000bc7000200000bb8*0000000137430000000d53454c45435"
               "42031005a0000000549"),
    ],
    "empty": [
        ("c", "510000000500"),
        ("s", "49000000045a0000000549"),
    ],
    "close": [
        ("c", "5800000004"),
    ],
}


def chunks(names=None):
    """The recorded recv() chunks of the scenarios, in order: (side, bytes)."""
    return [(REQ if side == "c" else RESP, bytes.fromhex(h.replace("*", "78" * 3000)))
            for name in (names or PG) for side, h in PG[name]]


def feed_all(parser, items):
    """Feed (side, data[, nbytes]) items with ts = index; all messages emitted."""
    return kit.feed(parser, items, tick=1, span=0)


def view(m):
    return kit.view([m], ("is_request", "operation", "status", "error", "expects_response",
                          "attributes", "size", "ts_start", "ts_end"))[0]




def msg(kind, body=b""):
    return kind + struct.pack(">I", 4 + len(body)) + body


def parse(name, text):
    return msg(b"P", name + b"\0" + text + b"\0\0\0")


def bind(stmt=b"", portal=b""):
    return msg(b"B", portal + b"\0" + stmt + b"\0\0\0\0\0\0\0")


DESCRIBE, EXECUTE, SYNC, FLUSH = msg(b"D", b"P\0"), msg(b"E", b"\0\0\0\0\0"), msg(b"S"), msg(b"H")
READY = msg(b"Z", b"I")


def complete(tag):
    return msg(b"C", tag + b"\0")


# -- real captures ------------------------------------------------------------------------

EXPECTED = [
    ("CREATE", "OK"), ("TRUNCATE", "OK"), ("INSERT", "OK"), ("SELECT", "OK"),
    ("SELECT", "42P01"), ("SELECT", "OK"), ("ALTER", "OK"),
    ("SELECT", "OK"), ("SELECT", "OK"), ("SELECT", "OK"),        # prepare, then 2 executes
    ("INSERT", "OK"),                                            # pipeline: one Sync
    ("UPDATE", "OK"), ("DELETE", "OK"), ("SELECT", "22012"),     # pipeline: three Syncs
    ("COPY", "OK"), ("LISTEN", "OK"), ("NOTIFY", "OK"), ("DO", "OK"), ("SELECT", "OK"),
    ("QUERY", "OK"), ("TERMINATE", None)]


def test_capture_every_message():
    p = PostgreSQLProtocol().parser()
    msgs = feed_all(p, chunks())
    assert [(q.operation, r and r.status) for q, r in kit.pairs(msgs)] == EXPECTED
    assert p.errors == 0 and not p.pending and p.group is None


def test_capture_details():
    msgs = feed_all(PostgreSQLParser(), chunks())
    got = kit.pairs(msgs)
    # nothing of the SCRAM exchange (PasswordMessage / SASL) is ever recorded
    assert not any(s in str(m.attributes) for m in msgs for s in ("SCRAM", "n,,n=", "c=biws"))
    for q, r in got:
        assert q.attributes["db.system"] == "postgresql" and q.attributes["db.namespace"] == "shop"
        assert q.attributes["db.operation.name"] == q.operation
    q, r = got[3]
    assert q.attributes["db.query.text"] == \
        "SELECT id, name, price FROM items WHERE price > $1 ORDER BY id"
    assert r.attributes == {"db.response.returned_rows": 2} and (q.size, r.size) == (120, 161)
    q, r = got[4]
    assert r.error and r.attributes == {"db.response.status_code": "42P01",
                                        "error.message": 'relation "nosuch" does not exist'}
    assert (r.size, r.ts_start, r.ts_end) == (112, 15, 16)      # E and Z in two reads
    assert got[5][1].attributes == {"db.response.returned_rows": 2}   # two statements
    assert got[6][0].attributes["db.query.text"] == "ALTER ROLE app PASSWORD '?'"
    assert not any("s3cret" in str(m.attributes) for m in msgs)
    # prepare=True: Parse of "_pg3_0" + Sync, then Bind/Execute of the name alone
    texts = {got[i][0].attributes["db.query.text"] for i in (7, 8, 9)}
    assert texts == {"SELECT name FROM items WHERE id = $1"}
    assert got[9][1].attributes == {"db.response.returned_rows": 1}
    q, r = got[10]                         # pipeline: 4 statements, one Sync
    assert q.attributes["db.operation.batch.size"] == 4
    assert q.attributes["db.query.text"] == \
        "INSERT INTO items (name, price) VALUES ($1, $2); SELECT count(*) FROM items"
    assert r.attributes == {"db.response.returned_rows": 1, "db.response.affected_rows": 3}
    q, r = got[11]                         # Sync sent in its own write
    assert (q.ts_start, q.ts_end, q.size) == (29, 30, 106)
    assert got[13][1].attributes["error.message"] == "division by zero"
    assert got[14][1].attributes == {"db.response.affected_rows": 2}    # COPY 2
    assert got[16][1].size == 38           # the notification is part of NOTIFY's reply
    assert got[17][1].size == 138 and not got[17][1].error            # NOTICE, not error
    assert got[18][1].size == 3085
    assert "db.query.text" not in got[19][0].attributes                # empty query
    assert got[20][0].expects_response is False


def test_joined_mid_connection():
    """No start-up seen: same messages but no namespace; a named statement prepared
    before the agent started is reported as EXECUTE."""
    names = [n for n in PG if n not in ("handshake", "prepare1")]
    msgs = feed_all(PostgreSQLParser(), chunks(names))
    ops = [(q.operation, r and r.status) for q, r in kit.pairs(msgs)]
    want = [e for i, e in enumerate(EXPECTED) if i not in (7, 8)]
    want[7] = ("EXECUTE", "OK")
    assert ops == want
    assert not any("db.namespace" in m.attributes for m in msgs)


def test_byte_by_byte_is_the_same_as_whole():
    whole = [view(m) for m in feed_all(PostgreSQLParser(), chunks())]
    p = PostgreSQLParser()
    out = []
    for ts, (side, data) in enumerate(chunks()):
        for i in range(len(data)):
            out += p.feed(side, data[i:i + 1], 1, ts, ts)
    assert [view(m) for m in out] == whole


def test_pipelined_groups_before_any_reply():
    groups = [parse(b"", b"INSERT INTO t VALUES ($1)") + bind() + DESCRIBE + EXECUTE + SYNC,
              parse(b"s1", b"UPDATE t SET a = $1") + bind(b"s1") + EXECUTE + SYNC,
              bind(b"s1") + EXECUTE + SYNC,
              parse(b"", b"SELECT 1/0") + bind() + EXECUTE + SYNC]
    replies = [msg(b"1") + msg(b"2") + msg(b"n") + complete(b"INSERT 0 1") + READY,
               msg(b"1") + msg(b"2") + complete(b"UPDATE 4") + READY,
               msg(b"2") + complete(b"UPDATE 2") + READY,
               msg(b"1") + msg(b"2") + msg(b"E", b"SERROR\0VERROR\0C22012\0Mdivision by zero\0\0")
               + READY]
    p = PostgreSQLParser()
    msgs = p.feed(REQ, b"".join(groups), sum(map(len, groups)), 1, 1)
    msgs += p.feed(RESP, b"".join(replies), sum(map(len, replies)), 2, 2)
    got = [(q.operation, q.attributes.get("db.query.text"), r.status,
            r.attributes.get("db.response.affected_rows")) for q, r in kit.pairs(msgs)]
    assert got == [("INSERT", "INSERT INTO t VALUES ($1)", "OK", 1),
                   ("UPDATE", "UPDATE t SET a = $1", "OK", 4),
                   ("UPDATE", "UPDATE t SET a = $1", "OK", 2),
                   ("SELECT", "SELECT 1/0", "22012", None)]
    assert [m.size for m in msgs] == [len(g) for g in groups] + [len(r) for r in replies]


def test_flush_then_sync_is_one_request_with_one_reply():
    """Parse/Describe/Flush is answered before the Bind/Execute/Sync that completes the
    group: everything up to ReadyForQuery is one reply."""
    p = PostgreSQLParser()
    first = parse(b"q", b"SELECT $1::int") + msg(b"D", b"Sq\0") + FLUSH
    early = msg(b"1") + msg(b"t", b"\0\x01\0\0\0\x17") + msg(b"T", b"\0\0")
    msgs = feed_all(p, [(REQ, first), (RESP, early), (REQ, bind(b"q") + EXECUTE + SYNC),
                        (RESP, msg(b"2") + msg(b"D", b"\0\x01\0\0\0\x011") +
                         complete(b"SELECT 1") + READY)])
    (q, r), = kit.pairs(msgs)
    assert (q.operation, q.ts_start, q.ts_end) == ("SELECT", 0, 2)
    assert (r.status, r.ts_start, r.ts_end) == ("OK", 1, 3)
    assert r.attributes == {"db.response.returned_rows": 1}


def test_function_call_and_lone_sync_and_close():
    p = PostgreSQLParser()
    msgs = feed_all(p, [(REQ, msg(b"F", b"\0\0\x04\x01\0\0\0\0\0\0")),
                        (RESP, msg(b"V", b"\0\0\0\x01t") + READY),
                        (REQ, SYNC + FLUSH), (RESP, READY),
                        (REQ, msg(b"C", b"Ss1\0") + SYNC), (RESP, msg(b"3") + READY)])
    assert [(q.operation, r.status) for q, r in kit.pairs(msgs)] == [
        ("FUNCTION_CALL", "OK"), ("SYNC", "OK"), ("SYNC", "OK")]


def test_notification_and_parameter_status_between_replies_are_skipped():
    p = PostgreSQLParser()
    note = msg(b"A", b"\0\0\0\x07chan\0hi\0") + msg(b"S", b"TimeZone\0UTC\0")
    msgs = feed_all(p, [(RESP, note), (REQ, msg(b"Q", b"SELECT 1\0")),
                        (RESP, msg(b"T", b"\0\0") + complete(b"SELECT 1") + READY),
                        (RESP, note)])
    assert [(q.operation, r.status, r.size) for q, r in kit.pairs(msgs)] == [("SELECT", "OK", 27)]


def test_ssl_request_refused_then_plain_startup():
    startup = bytes.fromhex(PG["handshake"][0][1])
    ssl = struct.pack(">II", 8, 80877103)
    p = PostgreSQLParser()
    msgs = feed_all(p, [(REQ, ssl), (RESP, b"N"), (REQ, startup)] + chunks()[1:])
    assert [(q.operation, r and r.status) for q, r in kit.pairs(msgs)] == EXPECTED
    p = PostgreSQLParser()
    msgs = feed_all(p, [(REQ, ssl), (RESP, b"S"), (REQ, b"\x16\x03\x01\x02\x00\x01" * 9),
                        (RESP, b"\x16\x03\x03\x00\x7a\x02" * 9), (REQ, msg(b"Q", b"SELECT 1\0"))])
    assert msgs == [] and p.encrypted and p.errors == 0


# -- holes, garbage, truncation ----------------------------------------------------------

def test_hole_over_big_row_emits_incomplete_then_resyncs():
    (s1, q), (s2, big) = chunks(["big"])
    items = [(s1, q), (s2, big[:1024], len(big))] + chunks(["empty", "close"])
    (q1, r1), (q2, r2), (q3, _) = kit.pairs(feed_all(PostgreSQLParser(), items))
    assert q1.operation == "SELECT" and r1.attributes == {"deeptrace.incomplete": True}
    assert r1.status is None and r1.size == len(big)      # to the end of the cut read
    assert (q2.operation, r2.status, q3.operation) == ("QUERY", "OK", "TERMINATE")


def test_hole_inside_row_that_ends_with_the_syscall():
    (s1, q), (s2, big) = chunks(["big"])
    cut = len(big) - 20                       # CommandComplete + ReadyForQuery come later
    items = [(s1, q), (s2, big[:700], cut), (s2, big[cut:])]
    (q1, r1), = kit.pairs(feed_all(PostgreSQLParser(), items))
    assert r1.status == "OK" and r1.attributes == {"db.response.returned_rows": 1}
    assert r1.size == len(big)


def test_hole_in_a_pipelined_write_closes_the_group():
    """Parse with a 3000-byte statement + Bind/Describe/Execute/Sync in one write, 1024
    bytes captured: the group is emitted (incomplete) and pairs with its reply."""
    text = b"SELECT " + b", ".join(b"%d" % i for i in range(700))
    write = parse(b"", text) + bind() + DESCRIBE + EXECUTE + SYNC
    reply = msg(b"1") + msg(b"2") + msg(b"T", b"\0\0") + complete(b"SELECT 1") + READY
    p = PostgreSQLParser()
    msgs = feed_all(p, [(REQ, write[:1024], len(write)), (RESP, reply),
                        (REQ, msg(b"Q", b"SELECT 2\0")), (RESP, complete(b"SELECT 1") + READY)])
    (q1, r1), (q2, r2) = kit.pairs(msgs)
    assert q1.operation == "SELECT" and q1.attributes["deeptrace.incomplete"] is True
    assert q1.attributes["db.query.text"].startswith("SELECT 0, 1, 2")
    assert q1.size == len(write) and r1.status == "OK" and r2.status == "OK"


def test_hole_in_long_simple_query_keeps_its_prefix():
    text = b"INSERT INTO t VALUES " + b",".join(b"(%d)" % i for i in range(900))
    q = msg(b"Q", text + b"\0")
    (req, resp), = kit.pairs(feed_all(PostgreSQLParser(), [(REQ, q[:1024], len(q)),
                                                      (RESP, complete(b"INSERT 0 900") + READY)]))
    assert req.operation == "INSERT" and req.size == len(q)
    assert resp.attributes == {"db.response.affected_rows": 900}


def test_garbage_then_a_valid_query():
    p = PostgreSQLParser()
    msgs = feed_all(p, [(REQ, b"\x7fGARBAGE that is no message"),
                        (RESP, b"Z\x00\x10\x00\x00 junk before any request"),
                        (REQ, msg(b"Q", b"SELECT 1\0")), (RESP, complete(b"SELECT 1") + READY)])
    assert [(m.is_request, m.operation, m.status) for m in msgs] == [
        (True, "SELECT", None), (False, "SELECT", "OK")]
    assert p.errors == 1


def test_truncated_reply_waits_for_the_rest():
    (s1, q), (s2, sel) = chunks(["select"])
    for cut in (1, 4, 60, len(sel) - 1):
        p = PostgreSQLParser()
        p.feed(s1, q, len(q), 1, 1)
        assert p.feed(s2, sel[:cut], cut, 2, 2) == []
        rest = p.feed(s2, sel[cut:], len(sel) - cut, 3, 3)
        assert [(m.status, m.ts_start, m.ts_end, m.size) for m in rest] == [("OK", 2, 3, len(sel))]


def test_tables_are_bounded():
    p = PostgreSQLParser(max_statements=30)
    for i in range(500):
        feed_all(p, [(REQ, parse(b"s%d" % i, b"SELECT %d" % i) + bind(b"s%d" % i, b"p%d" % i)
                      + SYNC), (RESP, msg(b"1") + msg(b"2") + READY)])
    assert len(p.statements) == 30 and len(p.portals) <= 65
    for i in range(3000):
        p.feed(REQ, msg(b"Q", b"SELECT 1\0"), 14, i, i)
    assert len(p.pending) <= 1024


# -- properties ---------------------------------------------------------------------------

VALID = chunks()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, 10_000), max_size=40))
def test_property_any_split_gives_the_same_messages(cuts):
    whole = [view(m) for m in feed_all(PostgreSQLParser(), VALID)]
    split = kit.feed_split(PostgreSQLParser(), VALID, cuts, tick=1, span=0)
    assert [view(m) for m in split] == whole


@settings(max_examples=200, deadline=None)
@given(kit.syscalls(st.one_of(st.binary(max_size=300), kit.suffixes([d for _, d in VALID])),
                    max_size=30))
def test_property_random_bytes_never_raise_and_stay_bounded(feeds):
    p = PostgreSQLParser(max_statements=20)
    for _ in kit.feed_each(p, feeds):
        assert len(p.statements) <= 20 and len(p.pending) <= 1024 and len(p.portals) <= 65


def test_huge_feeds_stay_bounded():
    p = PostgreSQLParser()
    blob = msg(b"Q", b"SELECT '" + b"z" * 100_000)[:1024]
    for i in range(50):
        p.feed(REQ, blob, 1 << 22, i, i)
        assert len(p.streams[REQ]) <= p.streams[REQ].cap


# -- detector -----------------------------------------------------------------------------

STARTUP = bytes.fromhex(PG["handshake"][0][1])
POSITIVE = [
    (STARTUP, 50000, 5432, REQUEST),
    (STARTUP, 50000, 7777, REQUEST),
    (struct.pack(">II", 8, 80877103), 50000, 5432, REQUEST),          # SSLRequest
    (struct.pack(">II", 8, 80877104), 50000, 7777, REQUEST),          # GSSENCRequest
    (bytes.fromhex(PG["create"][0][1]), 50000, 7777, REQUEST),
    (bytes.fromhex(PG["insert"][0][1]), 50000, 7777, REQUEST),        # P B D E S
    (bytes.fromhex(PG["prepare1"][0][1]), 50000, 7777, REQUEST),      # named Parse
    (bytes.fromhex(PG["pipeline"][0][1]), 50000, 7777, REQUEST),
    (msg(b"Q", b"SELECT '" + b"v" * 3000)[:1024], 1, 2, REQUEST),     # capture cut
    (bytes.fromhex(PG["handshake"][1][1]), 5432, 50000, RESPONSE),    # R SASL
    (msg(b"R", b"\0\0\0\0") + msg(b"S", b"a\0b\0"), 5432, 50000, RESPONSE),
    (msg(b"R", b"\0\0\0\x05salt"), 5432, 50000, RESPONSE),           # MD5
    (READY, 5432, 50000, RESPONSE),
    (bytes.fromhex(PG["error"][1][1]), 5432, 50000, RESPONSE),
    (msg(b"E", b"SFATAL\0VFATAL\0C28P01\0Mpassword\0\0"), 5432, 1, RESPONSE),
    (bytes.fromhex(PG["insert"][1][1]), 5432, 50000, RESPONSE),       # 1 2 n C Z
]
NEGATIVE = [
    (struct.pack(">IIII", 16, 80877102, 1, 2), 50000, 5432, 0),      # CancelRequest
    (struct.pack(">II", 8, 80877103), 50000, 5432, 0, "udp"),
    (msg(b"Q", b"\x01\x02binary\0"), 50000, 5432, 0),
    (msg(b"Q", b"SELECT 1\0") + msg(b"Q", b"SELECT 2\0"), 50000, 5432, 0),
    (msg(b"P", b"\0\0\0\0"), 50000, 5432, 0),
    (msg(b"Z", b"X"), 5432, 50000, 0),
    (msg(b"Z", b"I") + b"x", 5432, 50000, 0),
    (msg(b"E", b"\0portal\0\0\0\0\0"), 50000, 5432, 0),                # Execute, not Error
    (msg(b"R", b"\0\0\0\x63"), 5432, 50000, 0),
    (b"POST /x HTTP/1.1\r\n\r\n", 50000, 80, 0),
    (b"Q" + b"\x20" * 30, 1, 2, 0),
    (b"\x4a\x00\x00\x00\x0a8.0.36\x00" + bytes(64), 50000, 3306, 0),  # MySQL greeting
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40), 50000, 5432, 0),
    (b"", 5432, 5432, 0),
    (b"Z\0\0", 5432, 5432, 0),
    (b"Q\0\0\0\x20", 5432, 5432, 0),                                 # header alone
]


# Found by tests/test_detectors.py, which runs the kit's DetectorSuite on it.
detect_cases = kit.DetectCases(
    PostgreSQLProtocol, POSITIVE, NEGATIVE, ports=(5432,),
    inputs=st.builds(lambda t, n, rest: t + struct.pack(">I", n) + rest,
                     st.sampled_from([b"Q", b"P", b"R", b"Z", b"E", b"1", b"\0"]),
                     st.integers(0, 70), st.binary(max_size=59)))


def test_protocol_class():
    # (registration through the entry point: tests/test_detectors.py)
    assert isinstance(PostgreSQLProtocol().parser(), PostgreSQLParser)
    config = PostgreSQLProtocol.config_class(max_statements=9)
    assert PostgreSQLProtocol(config).parser().max_statements == 9


def test_extended_group_without_sync_stays_bounded():
    """20,000 Parse messages and no Sync (issue 13): the open group keeps a bounded
    number of statement texts (was all, scanned per message: O(n^2)), counted once."""
    p = PostgreSQLParser()
    items = [(REQ, b"".join(parse(b"", b"SELECT %d" % (i * 100 + j)) + bind() + EXECUTE
                            for j in range(100)))
             for i in range(200)]
    assert feed_all(p, items) == []
    assert len(p.group.texts) <= 64 and p.errors == 1
    (req,) = feed_all(p, [(REQ, SYNC)])
    assert req.operation == "SELECT" and req.attributes["db.operation.batch.size"] == 20000
    text = req.attributes["db.query.text"]
    assert text.startswith("SELECT 0; SELECT 1;") and "SELECT 19999" not in text
