"""MongoDB protocol plugin: the parser on bytes pymongo really sends (captured against an
in-test stand-in server), on OP_MSG / OP_QUERY / OP_REPLY / OP_COMPRESSED messages built
with ``bson.encode`` per the wire protocol spec (split, coalesced, with holes, garbage and
truncation), hypothesis properties, and the detector in Python and in the kernel.

MongoDB itself cannot be installed here, so ``FakeMongo`` below stands in for mongod: a
small OP_MSG / OP_QUERY responder that answers hello/isMaster, find, insert (with
duplicate-key write errors), ping, endSessions and fails saslStart and unknown commands.
It records every message each way, per connection, as the real client and it exchanged
them.
"""

import datetime
import socket
import struct
import threading
import zlib

import bson
import pymongo
import pytest
from bson.int64 import Int64
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deeptrace_core import testing as kit
from deeptrace_core.l7 import REQ, REQUEST, RESP, RESPONSE
from deeptrace_plugins.protocols.mongodb.parser import MongoDBParser, decode_doc, render
from deeptrace_plugins.protocols.mongodb.plugin import MongoDBProtocol, detect


# -- a stand-in for mongod ----------------------------------------------------------------

class FakeMongo:
    """Answers pymongo well enough to run a session; records (side, message) per
    connection ("c" from the client, "s" from the server)."""

    def __init__(self):
        self.ls = socket.socket()
        self.ls.bind(("127.0.0.1", 0))
        self.ls.listen(16)
        self.port = self.ls.getsockname()[1]
        self.conns = []
        self.docs = []
        self.next_id = 1000
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self):
        self.ls.close()

    def _accept(self):
        while True:
            try:
                c, _ = self.ls.accept()
            except OSError:
                return
            log = []
            self.conns.append(log)
            threading.Thread(target=self._serve, args=(c, log), daemon=True).start()

    def _serve(self, c, log):
        try:
            for head, body in kit.messages(c, 16,
                                           lambda head: struct.unpack_from("<i", head)[0] - 16):
                _, rid, _, op = struct.unpack("<iiii", head)
                msg = head + body
                log.append(("c", msg))
                if op == 2004:                              # OP_QUERY -> OP_REPLY
                    j = msg.index(b"\0", 20)
                    doc = bson.decode(msg[j + 9:j + 9 + struct.unpack_from("<i", msg, j + 9)[0]])
                    body = struct.pack("<iqii", 0, 0, 0, 1) + bson.encode(self._answer(doc, {}))
                    out = struct.pack("<iiii", 16 + len(body), self._id(), rid, 1) + body
                else:                                       # OP_MSG
                    flags = struct.unpack_from("<I", msg, 16)[0]
                    answer = self._answer(*sections(msg[20:]))
                    if flags & 2:                           # moreToCome: no reply
                        continue
                    body = b"\0\0\0\0\0" + bson.encode(answer)
                    out = struct.pack("<iiii", 16 + len(body), self._id(), rid, 2013) + body
                log.append(("s", out))
                c.sendall(out)
        except OSError:
            pass
        finally:
            c.close()

    def _answer(self, doc, seqs):
        cmd = next(iter(doc))
        if cmd in ("hello", "isMaster", "ismaster"):
            return {"helloOk": True, "isWritablePrimary": True, "ismaster": True,
                    "maxBsonObjectSize": 16777216, "maxMessageSizeBytes": 48000000,
                    "maxWriteBatchSize": 100000,
                    "localTime": datetime.datetime.now(datetime.timezone.utc),
                    "logicalSessionTimeoutMinutes": 30, "connectionId": 1,
                    "minWireVersion": 0, "maxWireVersion": 21, "readOnly": False, "ok": 1.0}
        if cmd == "find":
            return {"cursor": {"firstBatch": list(self.docs), "id": Int64(0),
                               "ns": f"{doc.get('$db')}.{doc['find']}"}, "ok": 1.0}
        if cmd == "insert":
            new = seqs.get("documents", doc.get("documents", []))
            ids = {d.get("_id") for d in self.docs}
            errs = [{"index": i, "code": 11000, "errmsg": "E11000 duplicate key error"}
                    for i, d in enumerate(new) if d.get("_id") in ids]
            self.docs += [d for d in new if d.get("_id") not in ids]
            out = {"n": len(new) - len(errs), "ok": 1.0}
            if errs:
                out["writeErrors"] = errs
            return out
        if cmd in ("ping", "endSessions"):
            return {"ok": 1.0}
        if cmd == "saslStart":
            return {"ok": 0.0, "errmsg": "Authentication failed.", "code": 18,
                    "codeName": "AuthenticationFailed"}
        return {"ok": 0.0, "errmsg": f"no such command: '{cmd}'", "code": 59,
                "codeName": "CommandNotFound"}

    def _id(self):
        with self.lock:
            self.next_id += 1
            return self.next_id


def sections(b):
    """(body document, {identifier: documents}) of a complete OP_MSG after its flags."""
    doc, seqs, i = None, {}, 0
    while i < len(b):
        if b[i] == 0:
            n = struct.unpack_from("<i", b, i + 1)[0]
            doc = bson.decode(b[i + 1:i + 1 + n])
            i += 1 + n
        elif b[i] == 1:
            size = struct.unpack_from("<i", b, i + 1)[0]
            j = b.index(b"\0", i + 5)
            k, docs = j + 1, []
            while k < i + 1 + size:
                n = struct.unpack_from("<i", b, k)[0]
                docs.append(bson.decode(b[k:k + n]))
                k += n
            seqs[b[i + 5:j].decode()] = docs
            i += 1 + size
        else:
            break
    return doc, seqs


@pytest.fixture(scope="module")
def capture():
    """What pymongo sent and the stand-in answered, per connection."""
    server = FakeMongo()
    opts = dict(directConnection=True, serverSelectionTimeoutMS=5000, connectTimeoutMS=5000)
    client = pymongo.MongoClient("127.0.0.1", server.port, **opts)
    try:
        items = client.shop.items
        items.insert_one({"_id": 1, "name": "apple", "price": 1.5})
        items.insert_many([{"_id": 2, "name": "pear"}, {"_id": 3, "name": "x" * 100}])
        assert len(list(items.find({"price": {"$gt": 1}}))) == 3
        with pytest.raises(pymongo.errors.DuplicateKeyError):
            items.insert_one({"_id": 1})
        with pytest.raises(pymongo.errors.OperationFailure):
            client.shop.command("boom")
        items.with_options(write_concern=pymongo.WriteConcern(w=0)).insert_one({"_id": 9})
        client.shop.command("ping")
    finally:
        client.close()
    auth = pymongo.MongoClient("127.0.0.1", server.port, username="app", password="s3cret",
                               authMechanism="SCRAM-SHA-256", **opts)
    try:
        with pytest.raises(pymongo.errors.OperationFailure):
            auth.shop.command("ping")
    finally:
        auth.close()
    server.close()
    return [[(REQ if side == "c" else RESP, m) for side, m in log] for log in server.conns]


def feed_all(parser, items):
    """Feed (side, data[, nbytes]) items with ts = index; all messages emitted."""
    return kit.feed(parser, items, tick=1, span=0)


def view(m):
    return kit.view([m], ("is_request", "key", "operation", "status", "error", "expects_response",
                          "attributes", "size", "ts_start", "ts_end"))[0]


def op_msg(doc, rid=7, to=0, flags=0, seqs=(), checksum=False):
    body = struct.pack("<I", flags | (1 if checksum else 0)) + b"\0" + bson.encode(doc)
    for ident, docs in seqs:
        payload = ident.encode() + b"\0" + b"".join(bson.encode(d) for d in docs)
        body += b"\1" + struct.pack("<i", 4 + len(payload)) + payload
    if checksum:
        body += b"\x12\x34\x56\x78"
    return struct.pack("<iiii", 16 + len(body), rid, to, 2013) + body


def op_query(ns, doc, rid=5):
    body = struct.pack("<i", 0) + ns.encode() + b"\0" + struct.pack("<ii", 0, -1) + bson.encode(doc)
    return struct.pack("<iiii", 16 + len(body), rid, 0, 2004) + body


def op_reply(docs, to=5, flags=0):
    body = struct.pack("<iqii", flags, 0, 0, len(docs)) + b"".join(bson.encode(d) for d in docs)
    return struct.pack("<iiii", 16 + len(body), 99, to, 1) + body


# -- what pymongo really sends -------------------------------------------------------------

def test_pymongo_session(capture):
    got = []
    for log in capture:
        p = MongoDBProtocol().parser()
        got += kit.pairs(feed_all(p, log))
        assert p.errors == 0
    ops = [(q.operation, r and r.status) for q, r in got]
    assert ops.count(("ismaster", "OK")) >= 2           # handshakes: OP_QUERY / OP_REPLY
    app = [x for x in ops if x[0] != "ismaster"]
    assert app == [("insert", "OK"), ("insert", "OK"), ("find", "OK"), ("insert", "11000"),
                   ("boom", "59"), ("insert", None), ("ping", "OK"), ("endSessions", "OK"),
                   ("saslStart", "18")]
    by = {}
    for q, r in got:
        by.setdefault(q.operation, []).append((q, r))
    q, r = by["ismaster"][0]
    assert q.attributes["db.namespace"] == "admin" and q.key == r.key
    q, r = by["insert"][0]
    assert q.attributes["db.system"] == "mongodb" and q.attributes["db.namespace"] == "shop"
    assert q.attributes["db.collection.name"] == "items"
    assert q.attributes["db.query.text"] == \
        '{"insert": "items", "ordered": true, ' \
        '"documents": [{"_id": 1, "name": "apple", "price": 1.5}]}'
    assert r.attributes == {"db.response.affected_rows": 1} and not r.error
    q, r = by["insert"][1]
    assert '"x' + "x" * 63 + '..."' in q.attributes["db.query.text"]   # strings cut at 64
    q, r = by["find"][0]
    assert q.attributes["db.query.text"] == '{"find": "items", "filter": {"price": {"$gt": 1}}}'
    assert r.attributes == {"db.response.returned_rows": 3}
    q, r = by["insert"][2]
    assert r.error and r.attributes["db.response.status_code"] == "11000"
    assert r.attributes["error.message"] == "E11000 duplicate key error"
    q, r = by["boom"][0]
    assert r.error and r.attributes == {"db.response.status_code": "59",
                                        "error.type": "CommandNotFound",
                                        "error.message": "no such command: 'boom'"}
    q, r = by["insert"][3]                               # w=0: OP_MSG moreToCome
    assert not q.expects_response and '"writeConcern": {"w": 0}' in q.attributes["db.query.text"]
    # authentication: the SCRAM payloads never appear
    q, r = by["saslStart"][0]
    assert '"payload": "?"' in q.attributes["db.query.text"]
    assert r.error and r.attributes["error.type"] == "AuthenticationFailed"
    spec = [q for q, _ in by["ismaster"]
            if "speculativeAuthenticate" in q.attributes["db.query.text"]]
    assert spec and '"speculativeAuthenticate": "?"' in spec[0].attributes["db.query.text"]
    for q, r in got:
        assert "n=app" not in str(q.attributes) and "s3cret" not in str(q.attributes)


def test_pymongo_session_split_anywhere_and_coalesced(capture):
    log = max(capture, key=len)
    whole = [view(m) for m in feed_all(MongoDBParser(), log)]
    p = MongoDBParser()
    out = []
    for ts, (side, data) in enumerate(log):
        for i in range(0, len(data), 7):
            out += p.feed(side, data[i:i + 7], len(data[i:i + 7]), ts, ts)
    assert [view(m) for m in out] == whole
    # every request of the log in one write, every reply in one read
    reqs = b"".join(d for s, d in log if s == REQ)
    reps = b"".join(d for s, d in log if s == RESP)
    p = MongoDBParser()
    msgs = p.feed(REQ, reqs, len(reqs), 1, 1) + p.feed(RESP, reps, len(reps), 2, 2)
    assert [(m.key, m.operation) for m in msgs if m.is_request] == \
        [(v[1], v[2]) for v in whole if v[0]]
    assert len(kit.pairs(msgs)) == len([v for v in whole if v[0]])


# -- built per the spec -------------------------------------------------------------------

def test_document_sequences_checksum_and_more_to_come():
    docs = [{"_id": i, "v": "y" * 10} for i in range(12)]
    req = op_msg({"insert": "c", "ordered": False, "$db": "d", "lsid": {"id": b"1" * 16}},
                 rid=11, seqs=[("documents", docs)], checksum=True)
    fire = op_msg({"delete": "c", "$db": "d"}, rid=12, flags=2,
                  seqs=[("deletes", [{"q": {"a": 1}, "limit": 0}])])
    reply = op_msg({"n": 12, "ok": 1.0}, rid=50, to=11)
    msgs = feed_all(MongoDBParser(), [(REQ, req + fire), (RESP, reply)])
    (q1, r1), (q2, r2) = kit.pairs(msgs)
    text = q1.attributes["db.query.text"]
    assert text.startswith('{"insert": "c", "ordered": false, '
                           '"documents": [{"_id": 0, "v": "yyyyyyyyyy"}')
    assert text.endswith('{"_id": 7, "v": "yyyyyyyyyy"}]}') and "lsid" not in text
    assert q1.key == r1.key == 11 and r1.attributes == {"db.response.affected_rows": 12}
    assert q2.operation == "delete" and not q2.expects_response and r2 is None
    assert '"deletes": [{"q": {"a": 1}, "limit": 0}]' in q2.attributes["db.query.text"]


def test_exhaust_replies_are_keyed_by_response_to():
    req = op_msg({"getMore": Int64(5), "collection": "c", "$db": "d"}, rid=20, flags=1 << 16)
    r1 = op_msg({"cursor": {"nextBatch": [{"a": 1}], "id": Int64(5), "ns": "d.c"}, "ok": 1},
                rid=30, to=20, flags=2)
    r2 = op_msg({"cursor": {"nextBatch": [], "id": Int64(0), "ns": "d.c"}, "ok": 1},
                rid=31, to=30)
    msgs = feed_all(MongoDBParser(), [(REQ, req), (RESP, r1 + r2)])
    assert [(m.is_request, m.key, m.operation) for m in msgs] == \
        [(True, 20, "getMore"), (False, 20, ""), (False, 30, "")]
    assert msgs[0].attributes["db.collection.name"] == "c"
    assert msgs[1].attributes == {"db.response.returned_rows": 1}


def test_credentials_are_redacted():
    cmds = [{"createUser": "bob", "pwd": "hunter2", "roles": [], "$db": "admin"},
            {"updateUser": "bob", "pwd": "hunter2", "$db": "admin"},
            {"authenticate": 1, "user": "bob", "nonce": "abc", "key": "hunter2", "$db": "x"},
            {"saslContinue": 1, "conversationId": 1, "payload": b"c=biws,r=hunter2", "$db": "x"},
            {"hello": 1, "speculativeAuthenticate": {"saslStart": 1, "payload": b"hunter2"}}]
    msgs = feed_all(MongoDBParser(), [(REQ, op_msg(c, rid=i + 1)) for i, c in enumerate(cmds)])
    texts = [m.attributes["db.query.text"] for m in msgs]
    assert all("hunter2" not in t for t in texts)
    assert texts[0] == '{"createUser": "bob", "pwd": "?", "roles": []}'
    assert texts[2] == '{"authenticate": 1, "user": "bob", "nonce": "?", "key": "?"}'
    reply = op_msg({"conversationId": 1, "done": False, "payload": b"r=hunter2", "ok": 1},
                   rid=9, to=4)
    (r,) = MongoDBParser().feed(RESP, reply, len(reply), 1, 1)
    assert "hunter2" not in str(r.attributes) and r.status == "OK"


def test_rendering_is_compact_and_bounded():
    doc = {"find": "c", "filter": {"a": {"b": {"c": {"d": {"e": 1}}}}},
           "in": list(range(20)), "s": "z" * 500, "oid": bson.ObjectId("64b7f0c2a1b2c3d4e5f60718"),
           "when": datetime.datetime(2024, 1, 2, 3, 4, 5), "bin": bson.Binary(b"\0" * 40),
           "n": None, "f": 2.5, "t": True, "big": Int64(1 << 40)}
    text = render(doc)
    assert '"filter": {"a": {"b": {"c": {...}}}}' in text
    assert '"in": [0, 1, 2, 3, 4, 5, 6, 7, "... 12 more"]' not in text   # ints render bare
    assert '"in": [0, 1, 2, 3, 4, 5, 6, 7, ... 12 more]' in text
    assert '"s": "' + "z" * 64 + '..."' in text and '"64b7f0c2a1b2c3d4e5f60718"' in text
    assert '"bin": <binary 40>' in text and '"n": null, "f": 2.5, "t": true' in text
    huge = {f"k{i}": "v" * 60 for i in range(400)}
    req = op_msg({"insert": "c", "$db": "d", **huge})
    (m,) = MongoDBParser().feed(REQ, req, len(req), 1, 1)
    assert len(m.attributes["db.query.text"]) <= 2048


def test_legacy_op_query_op_reply_and_other_opcodes():
    items = [(REQ, op_query("admin.$cmd", {"isMaster": 1, "client": {"app": "x"}}, rid=5)),
             (RESP, op_reply([{"ismaster": True, "ok": 1.0}], to=5)),
             (REQ, op_query("shop.items", {"$query": {"a": 1}, "$orderby": {"b": 1}}, rid=6)),
             (RESP, op_reply([{"a": 1}, {"a": 1, "b": 2}], to=6)),
             (REQ, op_query("shop.items", {"a": {"$bad": 1}}, rid=7)),
             (RESP, op_reply([{"$err": "unknown operator: $bad", "code": 2}], to=7, flags=2)),
             (REQ, struct.pack("<iiii", 36, 8, 0, 2005) + b"\0\0\0\0shop.items\0\0\0\0\0\0"),
             (RESP, op_reply([], to=8)),
             (REQ, struct.pack("<iiii", 24, 9, 0, 2007) + struct.pack("<ii", 0, 0))]
    got = [(q.operation, q.attributes.get("db.namespace"), r and r.status,
            r and r.attributes) for q, r in kit.pairs(feed_all(MongoDBParser(), items))]
    assert got == [
        ("isMaster", "admin", "OK", {}),
        ("find", "shop", "OK", {"db.response.returned_rows": 2}),
        ("find", "shop", "2", {"db.response.status_code": "2",
                               "error.message": "unknown operator: $bad"}),
        ("getMore", None, "OK", {"db.response.returned_rows": 0}),
        ("killCursors", None, None, None)]


def test_op_compressed():
    inner = op_msg({"find": "c", "filter": {"a": 1}, "$db": "d"}, rid=40)
    body = inner[16:]

    def compressed(cid, payload, rid=40):
        b = struct.pack("<iiB", 2013, len(body), cid) + payload
        return struct.pack("<iiii", 16 + len(b), rid, 0, 2012) + b
    msgs = feed_all(MongoDBParser(), [(REQ, compressed(2, zlib.compress(body))),
                                      (REQ, compressed(0, body, rid=41)),
                                      (REQ, compressed(1, b"snappy bytes", rid=42)),
                                      (REQ, compressed(2, b"not zlib", rid=43))])
    assert [(m.key, m.operation, m.attributes.get("db.query.text")) for m in msgs] == [
        (40, "find", '{"find": "c", "filter": {"a": 1}}'),
        (41, "find", '{"find": "c", "filter": {"a": 1}}'),
        (42, "OP_COMPRESSED", None), (43, "OP_COMPRESSED", None)]


# -- holes, garbage, truncation ----------------------------------------------------------

def test_hole_in_big_insert_then_next_message():
    docs = [{"_id": i, "blob": "b" * 500} for i in range(200)]
    big = op_msg({"insert": "c", "$db": "d"}, rid=1, seqs=[("documents", docs)])
    small = op_msg({"ping": 1, "$db": "d"}, rid=2)
    p = MongoDBParser()
    msgs = feed_all(p, [(REQ, big[:1024], len(big)), (REQ, small),
                        (RESP, op_msg({"n": 200, "ok": 1}, to=1) + op_msg({"ok": 1}, to=2))])
    (q1, r1), (q2, r2) = kit.pairs(msgs)
    assert q1.operation == "insert" and q1.size == len(big)
    assert q1.attributes["db.query.text"].startswith(
        '{"insert": "c", "documents": [{"_id": 0, "blob": "' + "b" * 64 + '..."}')
    assert q2.operation == "ping" and r1.attributes == {"db.response.affected_rows": 200}


def test_hole_in_reply_body():
    """A reply cut before "ok" (it comes last on success) counts as OK; an error reply
    puts ok, errmsg, code first, so they are still seen (unless errmsg itself is cut)."""
    rows = [{"_id": i, "blob": "b" * 300} for i in range(50)]
    ok = op_msg({"cursor": {"firstBatch": rows, "id": Int64(0), "ns": "d.c"}, "ok": 1}, to=3)
    err = op_msg({"ok": 0.0, "errmsg": "Document failed validation", "code": 121,
                  "codeName": "DocumentValidationFailure",
                  "errInfo": {"details": ["d" * 100] * 30}}, to=4)
    long = op_msg({"ok": 0.0, "errmsg": "x" * 2000, "code": 50}, to=5)
    p = MongoDBParser()
    msgs = feed_all(p, [(RESP, ok[:1024], len(ok)), (RESP, err[:1024], len(err)),
                        (RESP, long[:1024], len(long))])
    assert [(m.key, m.status, m.error, m.size) for m in msgs] == \
        [(3, "OK", False, len(ok)), (4, "121", True, len(err)), (5, "ERR", True, len(long))]
    assert msgs[0].attributes == {}
    assert msgs[1].attributes == {"db.response.status_code": "121",
                                  "error.type": "DocumentValidationFailure",
                                  "error.message": "Document failed validation"}


def test_header_in_a_hole_resyncs_at_next_syscall():
    a, b = op_msg({"ping": 1}, rid=1), op_msg({"ping": 1}, rid=2)
    c = op_msg({"hello": 1}, rid=3)
    p = MongoDBParser()
    msgs = feed_all(p, [(REQ, a[:33], len(a) + len(b)), (REQ, c)])
    assert [(m.key, m.operation) for m in msgs] == [(1, "ping"), (3, "hello")]
    assert p.errors == 1


def test_garbage_and_truncation():
    p = MongoDBParser()
    good = op_msg({"find": "c", "$db": "d"}, rid=77)
    msgs = feed_all(p, [(REQ, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), (REQ, good[:30])])
    assert msgs == [] and p.errors == 1
    msgs = p.feed(REQ, good[30:], len(good) - 30, 5, 6)
    assert [(m.key, m.operation, m.ts_start, m.ts_end, m.size) for m in msgs] == \
        [(77, "find", 1, 6, len(good))]


def test_decode_doc_on_cut_bytes():
    raw = bson.encode({"a": 1, "b": "text", "c": {"d": [1, 2]}, "e": 2.5})
    assert decode_doc(raw) == {"a": 1, "b": "text", "c": {"d": [1, 2]}, "e": 2.5}
    assert decode_doc(raw[:25]) == {"a": 1, "b": "text"}          # "c" key cut
    assert decode_doc(raw[:30]) == {"a": 1, "b": "text", "c": ...}  # "c" value cut
    assert decode_doc(raw[:20]) == {"a": 1, "b": ...}
    assert decode_doc(raw[:3]) is None
    assert decode_doc(b"\xff\xff\xff\x7f\x02k\0garbage") is not None


# -- properties ---------------------------------------------------------------------------

BUILT = [(REQ, op_msg({"insert": "c", "$db": "d"}, rid=1, seqs=[("documents", [{"a": 1}] * 3)])),
         (RESP, op_msg({"n": 3, "ok": 1}, rid=9, to=1)),
         (REQ, op_query("admin.$cmd", {"isMaster": 1}, rid=2)),
         (RESP, op_reply([{"ok": 1}], to=2)),
         (REQ, op_msg({"find": "c", "filter": {"x": "y" * 80}, "$db": "d"}, rid=3, checksum=True)),
         (RESP, op_msg({"ok": 0, "code": 13, "codeName": "Unauthorized", "errmsg": "no"}, to=3))]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, 10_000), max_size=30))
def test_property_any_split_gives_the_same_messages(cuts):
    whole = [view(m) for m in feed_all(MongoDBParser(), BUILT)]
    assert [view(m) for m in kit.feed_split(MongoDBParser(), BUILT, cuts, tick=1, span=0)] == whole


def _damaged(d):
    """A valid message with one byte changed, starting anywhere."""
    return st.tuples(st.integers(0, len(d)), st.integers(0, len(d) - 1),
                     st.integers(0, 255)).map(
        lambda t: (d[:t[1]] + bytes([t[2]]) + d[t[1] + 1:])[t[0]:])


@settings(max_examples=200, deadline=None)
@given(kit.syscalls(st.one_of(st.binary(max_size=300),
                              st.sampled_from([d for _, d in BUILT]).flatmap(_damaged)),
                    max_size=30))
def test_property_random_bytes_never_raise_and_stay_bounded(feeds):
    p = MongoDBParser()
    list(kit.feed_each(p, feeds))   # checks the streams' bounds after each feed


def test_huge_feeds_stay_bounded():
    p = MongoDBParser()
    blob = struct.pack("<iiii", 40_000_000, 1, 0, 2013) + b"\0\0\0\0\0" + b"\xff" * 1000
    for i in range(50):
        p.feed(REQ, blob if i == 0 else b"\xaa" * 1024, 1 << 20, i, i)
        assert len(p.streams[REQ]) <= p.streams[REQ].cap


# -- detector -----------------------------------------------------------------------------

POSITIVE = [
    (op_query("admin.$cmd", {"isMaster": 1}), 50000, 27017, REQUEST),
    (op_msg({"hello": 1, "$db": "admin"}), 50000, 27017, REQUEST),
    (op_msg({"insert": "c"}, seqs=[("documents", [{"a": 1}])]), 50000, 7777, REQUEST),
    (op_msg({"ok": 1.0}, to=7), 27017, 50000, RESPONSE),
    (op_msg({"n": 1}, to=7, flags=2), 27017, 50000, RESPONSE),
    (op_reply([{"ismaster": True, "ok": 1.0}]), 27017, 50000, RESPONSE),
    (op_msg({"insert": "c", "x": "v" * 3000})[:1024], 1, 2, REQUEST),
]
NEGATIVE = [
    (op_msg({"hello": 1}), 50000, 27017, 0, "udp"),
    (op_msg({"hello": 1}, flags=4), 50000, 27017, 0),               # reserved flag bit
    (op_msg({"hello": 1})[:20], 50000, 27017, 0),
    (struct.pack("<iiii", 10, 1, 0, 2013) + bytes(20), 50000, 27017, 0),
    (struct.pack("<iiii", 100, 1, 0, 2012) + bytes(84), 50000, 27017, 0),
    (struct.pack("<iiii", 100, 1, 0, 2013) + b"\0\0\0\0\2" + bytes(80), 50000, 27017, 0),
    (struct.pack("<iiii", 100, 1, 0, 2013) + b"\0\0\0\0\0" + struct.pack("<i", 500) +
     b"\x10a\0" + bytes(70), 1, 2, 0),                               # body longer than message
    (struct.pack("<iiii", 60, 1, 0, 2004) + b"\1\0\0\0" + bytes(40), 1, 2, 0),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 50000, 80, 0),
    (b"\x4a\x00\x00\x00\x0a8.0.36\x00" + bytes(64), 50000, 3306, 0),
    (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", 50000, 5432, 0),
    (b"", 27017, 27017, 0),
]


# Found by tests/test_detectors.py, which runs the kit's DetectorSuite on it.
detect_cases = kit.DetectCases(
    MongoDBProtocol, POSITIVE, NEGATIVE, ports=(27017,),
    inputs=st.builds(lambda n, to, op, rest: struct.pack("<iiii", n, 1, to, op) + rest,
                     st.integers(0, 200), st.sampled_from([0, 5]),
                     st.sampled_from([1, 2004, 2013, 2012]), st.binary(max_size=48)))


def test_detect_on_what_pymongo_sent(capture):
    for log in capture:
        (s1, first), (s2, second) = log[:2]
        assert (detect(first, 50000, 27017, "tcp"), detect(second, 27017, 50000, "tcp")) == \
            (REQUEST, RESPONSE)


def test_protocol_class():
    # (registration through the entry point: tests/test_detectors.py)
    assert isinstance(MongoDBProtocol().parser(), MongoDBParser)


def test_detect_kernel_matches_python_on_what_pymongo_sent(capture):
    kit.assert_kernel_matches(kit.kernel_detector(MongoDBProtocol), detect,
                              [(m, 1, 2, "tcp") for log in capture for _, m in log[:4]])


def test_nested_op_compressed_is_a_parse_error_not_a_crash():
    """OP_COMPRESSED wrapping OP_COMPRESSED (issue 13): no exception, counted, and the
    message still pairs by its request id."""
    inner_body = struct.pack("<iiB", 2013, 5, 0) + b"\0" * 5
    nested = struct.pack("<iiB", 2012, len(inner_body), 0) + inner_body
    req = struct.pack("<iiii", 16 + len(nested), 50, 0, 2012) + nested
    p = MongoDBParser()
    msgs = feed_all(p, [(REQ, req), (REQ, op_msg({"ping": 1, "$db": "d"}, rid=51))])
    assert [(m.key, m.operation) for m in msgs] == [(50, "OP_COMPRESSED"), (51, "ping")]
    assert p.errors == 1
