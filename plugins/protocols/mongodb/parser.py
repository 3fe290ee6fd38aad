"""MongoDB wire protocol: OP_MSG, the legacy OP_QUERY / OP_REPLY (handshakes), and
OP_COMPRESSED with the zlib or noop compressor.

Framing (a 16-byte header: messageLength, requestID, responseTo, opCode) is read here so
that bodies the capture cut can be stepped over; documents are decoded with pymongo's
``bson``. A document cut by the capture is scanned element by element instead, so the
command name and the fields before the cut are still reported. Requests carry
``key = requestID``, replies ``key = responseTo``: the stage pairs them by key.
"""

import struct
import zlib

import bson
from bson.codec_options import CodecOptions, DatetimeConversion

from deeptrace_core.l7 import REQ, FramedParser, Message, ParseError

OP_REPLY, OP_UPDATE, OP_INSERT, OP_QUERY = 1, 2001, 2002, 2004
OP_GET_MORE, OP_DELETE, OP_KILL_CURSORS, OP_COMPRESSED, OP_MSG = 2005, 2006, 2007, 2012, 2013
OPCODES = {OP_REPLY, OP_UPDATE, OP_INSERT, OP_QUERY, OP_GET_MORE, OP_DELETE, OP_KILL_CURSORS,
           OP_COMPRESSED, OP_MSG}
MORE_TO_COME, CHECKSUM = 0x2, 0x1
MAX_MESSAGE = 64 * 1024 * 1024     # servers cap messages at 48 MB
PEEK = 16 * 1024                   # bytes of a message decoded (the rest is stepped over)
TEXT_MAX = 2048                    # characters of db.query.text
STR_MAX = 64                       # characters kept of each string value
LIST_MAX = 8                       # items kept of each array / document sequence
KEYS_MAX = 24                      # fields kept of each document
DEPTH_MAX = 4
# Field values never recorded: SCRAM/x509 payloads, legacy authenticate key and nonce,
# passwords of createUser/updateUser, the speculative auth folded into hello.
SECRET = {"payload", "pwd", "key", "nonce", "speculativeAuthenticate", "password"}
# Command-protocol noise left out of db.query.text ($db is db.namespace).
NOISE = {"$db", "lsid", "$clusterTime"}
COLLECTION_COMMANDS = {"find", "insert", "update", "delete", "aggregate", "count", "distinct",
                       "findAndModify", "getMore", "create", "drop", "createIndexes",
                       "dropIndexes", "listIndexes", "mapReduce", "collMod", "explain"}
OPTS = CodecOptions(unicode_decode_error_handler="replace",
                    datetime_conversion=DatetimeConversion.DATETIME_AUTO)
_I32 = struct.Struct("<i")
_HEAD = struct.Struct("<iiii")
_SIZES = {0x01: 8, 0x07: 12, 0x08: 1, 0x09: 8, 0x0a: 0, 0x10: 4, 0x11: 8, 0x12: 8, 0x13: 16,
          0x7f: 0, 0xff: 0}


class Truncated(dict):
    """A document decoded from a prefix: the fields before the cut."""


def decode_doc(b: bytes):
    """A document from bytes that may be cut short: a dict, or a Truncated dict with the
    complete top-level fields before the cut; None if not even its length is there."""
    if len(b) < 5:
        return None
    n = _I32.unpack_from(b)[0]
    if 5 <= n <= len(b):
        try:
            return bson.decode(b[:n], codec_options=OPTS)
        except Exception:  # noqa: BLE001 - corrupt or hostile bytes: scan what we can
            pass
    return _scan(b[:max(5, min(n, len(b)))] if n >= 5 else b)


def _scan(b: bytes) -> Truncated:
    out = Truncated()
    i = 4
    while i < len(b) and b[i] != 0 and len(out) < KEYS_MAX:
        t = b[i]
        j = b.find(b"\0", i + 1)
        if j < 0:
            break
        key = b[i + 1:j].decode("utf-8", "replace")
        v = j + 1
        if t in _SIZES:
            end = v + _SIZES[t]
        elif t in (0x02, 0x0d, 0x0e):                  # string, code, symbol
            end = v + 4 + _I32.unpack_from(b, v)[0] if v + 4 <= len(b) else len(b) + 1
        elif t in (0x03, 0x04, 0x0f):                  # document, array, code w/ scope
            end = v + _I32.unpack_from(b, v)[0] if v + 4 <= len(b) else len(b) + 1
        elif t == 0x05:                                # binary
            end = v + 5 + _I32.unpack_from(b, v)[0] if v + 4 <= len(b) else len(b) + 1
        elif t == 0x0b:                                # regex: two cstrings
            k = b.find(b"\0", v)
            k = b.find(b"\0", k + 1) if k >= 0 else -1
            end = k + 1 if k >= 0 else len(b) + 1
        elif t == 0x0c:                                # DBPointer
            end = v + 4 + _I32.unpack_from(b, v)[0] + 12 if v + 4 <= len(b) else len(b) + 1
        else:
            break
        if end <= v - 1 or end > len(b):
            out[key] = ...                             # cut here: the key, no value
            break
        try:
            out.update(bson.decode(_I32.pack(end - i + 5) + b[i:end] + b"\0",
                                   codec_options=OPTS))
        except Exception:  # noqa: BLE001
            break
        i = end
    return out


def render(v, depth=0) -> str:
    """A compact, JSON-like rendering with long strings, arrays and documents cut and
    secret fields replaced by "?"."""
    if isinstance(v, dict):
        if depth >= DEPTH_MAX:
            return "{...}"
        parts = []
        for k, x in v.items():
            if len(parts) >= KEYS_MAX:
                parts.append("...")
                break
            if k in NOISE and depth == 0:
                continue
            val = '"?"' if k in SECRET else "..." if x is ... else render(x, depth + 1)
            parts.append(f"{_string(k)}: {val}")
        if isinstance(v, Truncated):
            parts.append("...")
        return "{" + ", ".join(parts) + "}"
    if isinstance(v, (list, tuple)):
        if depth >= DEPTH_MAX:
            return "[...]"
        items = [render(x, depth + 1) for x in v[:LIST_MAX]]
        if len(v) > LIST_MAX:
            items.append(f"... {len(v) - LIST_MAX} more")
        return "[" + ", ".join(items) + "]"
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, bool) or v is None:
        return {True: "true", False: "false", None: "null"}[v]
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, bytes):
        return f"<binary {len(v)}>"
    return _string(str(v))                    # ObjectId, datetime, Decimal128, Timestamp...


def _string(s: str) -> str:
    if len(s) > STR_MAX:
        s = s[:STR_MAX] + "..."
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


class MongoDBParser(FramedParser):
    protocol = "mongodb"

    def __init__(self):
        super().__init__()

    def frame(self, side, stream, out) -> bool:
        head = stream.peek(16)
        if len(head) < 16:
            if len(stream) > len(head):
                raise ParseError("mongodb: header not captured")
            return False
        length, request_id, response_to, opcode = _HEAD.unpack(head)
        if not 16 <= length <= MAX_MESSAGE or opcode not in OPCODES:
            raise ParseError(f"mongodb: not a message header (opCode {opcode})")
        want = min(length, PEEK)
        data = stream.peek(want)
        if len(data) < want and len(stream) <= len(data):
            return False
        msg = self._message(side == REQ, request_id, response_to, opcode, data[16:],
                            len(data) < length)
        got = stream.consume(length)
        self.skip[side] = length - got
        self.orphan[side] = msg is None
        if msg is not None:
            self.held[side] = msg
        else:
            stream.take_span()
        return True

    # -- one message --------------------------------------------------------------------

    def _message(self, is_request, request_id, response_to, opcode, body, cut):
        if opcode == OP_COMPRESSED:
            if len(body) < 9:
                return None
            opcode, size, compressor = struct.unpack_from("<iiB", body)
            inner = body[9:]
            if compressor == 2 and not cut:
                try:
                    d = zlib.decompressobj()
                    inner = d.decompress(inner, PEEK)
                    cut = size > len(inner)
                except zlib.error:
                    compressor = -1
            if opcode == OP_COMPRESSED:     # nested: not allowed, not followed
                self.errors += 1
            if compressor not in (0, 2) or opcode not in OPCODES or opcode == OP_COMPRESSED:
                msg = Message(is_request, operation="OP_COMPRESSED",
                              attributes={"db.system": "mongodb"} if is_request else {})
                msg.key = request_id if is_request else response_to
                return msg
            body = inner
        flags, doc, seqs, reply_count, op = 0, None, {}, None, None
        ns = None
        if opcode == OP_MSG:
            if len(body) < 4:
                return None
            flags = _I32.unpack_from(body)[0]
            doc, seqs = self._sections(body[4:])
        elif opcode == OP_QUERY:
            j = body.find(b"\0", 4)
            if j < 0:
                return None
            full = body[4:j].decode("utf-8", "replace")
            ns, _, coll = full.partition(".")
            doc = decode_doc(body[j + 9:])
            if isinstance(doc, dict) and isinstance(doc.get("$query"), dict):
                doc = doc["$query"]
            if coll != "$cmd" and doc is not None:
                doc = {"find": coll, "filter": doc}
        elif opcode == OP_REPLY:
            if len(body) >= 20:
                flags = _I32.unpack_from(body)[0]
                reply_count = _I32.unpack_from(body, 16)[0]
                doc = decode_doc(body[20:])
        elif opcode == OP_GET_MORE:
            op = "getMore"
        else:
            op = {OP_UPDATE: "update", OP_INSERT: "insert", OP_DELETE: "delete",
                  OP_KILL_CURSORS: "killCursors"}[opcode]
        if is_request:
            return self._request(request_id, opcode, flags, doc, seqs, op, ns)
        return self._reply(response_to, opcode, flags, doc, reply_count)

    @staticmethod
    def _sections(b):
        """The body document and the document sequences (identifier -> documents) of an
        OP_MSG, from bytes that may be cut short."""
        doc, seqs, i = None, {}, 0
        while i < len(b):
            kind = b[i]
            if kind == 0:
                d = decode_doc(b[i + 1:])
                if d is None:
                    break
                doc = d if doc is None else doc
                if isinstance(d, Truncated):
                    break
                i += 1 + _I32.unpack_from(b, i + 1)[0]
            elif kind == 1 and i + 5 <= len(b):
                size = _I32.unpack_from(b, i + 1)[0]
                end = min(i + 1 + size, len(b))
                j = b.find(b"\0", i + 5, end)
                if size < 5 or j < 0:
                    break
                ident = b[i + 5:j].decode("utf-8", "replace")
                docs, k = [], j + 1
                while k < end and len(docs) < LIST_MAX:
                    d = decode_doc(b[k:end])
                    if d is None:
                        break
                    docs.append(d)
                    if isinstance(d, Truncated):
                        break
                    k += _I32.unpack_from(b, k)[0]
                seqs[ident] = docs
                if i + 1 + size > len(b):
                    break
                i += 1 + size
            else:
                break                      # checksum, or bytes the capture cut
        return doc, seqs

    def _request(self, request_id, opcode, flags, doc, seqs, op, ns):
        attrs = {"db.system": "mongodb"}
        if isinstance(doc, dict) and doc:
            first = next(iter(doc))
            op = op or first
            coll = doc.get("collection") if first == "getMore" else doc[first]
            if isinstance(coll, str) and first in COLLECTION_COMMANDS:
                attrs["db.collection.name"] = coll
            ns = doc.get("$db") if isinstance(doc.get("$db"), str) else ns
            if seqs:
                doc = dict(doc)
                for ident, docs in seqs.items():
                    doc.setdefault(ident, docs)
            attrs["db.query.text"] = render(doc)[:TEXT_MAX]
        op = op or "OP_MSG"
        attrs["db.operation.name"] = op
        if ns:
            attrs["db.namespace"] = ns
        return Message(True, operation=op, attributes=attrs, key=request_id,
                       expects_response=not (opcode == OP_MSG and flags & MORE_TO_COME)
                       and opcode in (OP_MSG, OP_QUERY, OP_GET_MORE))

    def _reply(self, response_to, opcode, flags, doc, reply_count):
        attrs = {}
        msg = Message(False, attributes=attrs, key=response_to, status="OK")
        failure = opcode == OP_REPLY and flags & 0x2      # QueryFailure
        if not isinstance(doc, dict):
            if failure:
                msg.status, msg.error = "ERR", True
            elif reply_count is not None and reply_count >= 0:
                attrs["db.response.returned_rows"] = reply_count
            return msg
        # The document that describes the failure: the reply itself (ok != 1, legacy
        # $err), else the first write error or the write concern error. A reply cut by
        # the capture before "ok" (it comes last on success) counts as a success.
        ok = doc.get("ok")
        err = None
        if failure or "$err" in doc or (isinstance(ok, (int, float)) and ok != 1):
            err = doc
        else:
            werr = doc.get("writeErrors")
            if isinstance(werr, list) and werr and isinstance(werr[0], dict):
                err = werr[0]
            elif isinstance(doc.get("writeConcernError"), dict):
                err = doc["writeConcernError"]
        if err is not None:
            msg.error = True
            code = err.get("code")
            name = err.get("codeName")
            msg.status = str(code) if isinstance(code, int) else str(name or "ERR")
            if isinstance(code, int):
                attrs["db.response.status_code"] = str(code)
            if isinstance(name, str):
                attrs["error.type"] = name
            text = err.get("errmsg", err.get("$err"))
            if isinstance(text, str):
                attrs["error.message"] = text[:256]
        cursor = doc.get("cursor")
        if isinstance(cursor, dict):
            batch = cursor.get("firstBatch", cursor.get("nextBatch"))
            if isinstance(batch, list) and not isinstance(cursor, Truncated):
                attrs["db.response.returned_rows"] = len(batch)
        elif reply_count is not None and reply_count >= 0 and err is None and ok is None:
            attrs["db.response.returned_rows"] = reply_count    # a legacy query's documents
        n = doc.get("n")
        if isinstance(n, int) and not isinstance(n, bool) and cursor is None:
            attrs["db.response.affected_rows"] = n
        return msg
