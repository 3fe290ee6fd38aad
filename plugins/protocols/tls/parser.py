"""TLS handshake parser: the ClientHello is the request, the ServerHello its response.

From the ClientHello: the server name (SNI, `tls.client.server_name`) and the highest
version offered; from the ServerHello: the version chosen (`tls.protocol.version`, the
span's status, e.g. "TLSv1.3") and the cipher suite (`tls.cipher`). A hello the capture
cut is read as far as it goes. Everything after a side's hello is ciphertext or
encrypted handshake: dropped unread.
"""

import struct

from deeptrace_core.l7 import Message, ParseError, Parser

VERSIONS = {0x0300: "SSLv3", 0x0301: "TLSv1.0", 0x0302: "TLSv1.1", 0x0303: "TLSv1.2",
            0x0304: "TLSv1.3"}
# IANA names of the suites OpenSSL, Go and browsers negotiate; others are given in hex.
CIPHERS = {
    0x1301: "TLS_AES_128_GCM_SHA256", 0x1302: "TLS_AES_256_GCM_SHA384",
    0x1303: "TLS_CHACHA20_POLY1305_SHA256",
    0xC02B: "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    0xC02C: "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    0xC02F: "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    0xC030: "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    0xCCA8: "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
    0xCCA9: "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    0x009E: "TLS_DHE_RSA_WITH_AES_128_GCM_SHA256", 0x009F: "TLS_DHE_RSA_WITH_AES_256_GCM_SHA384",
}
EXT_SNI, EXT_SUPPORTED_VERSIONS = 0, 43
CLIENT_HELLO, SERVER_HELLO = 1, 2
MAX_RECORD = 18432


def _version(v: int) -> str:
    return VERSIONS.get(v, f"0x{v:04x}")


def _extensions(b: bytes, o: int) -> tuple:
    """([(type, data)] of the extensions from offset `o` (their total length) on, as far
    as `b` goes; whether that was all of them (False: the capture cut the hello)."""
    if o + 2 > len(b):
        return [], False
    total = o + 2 + int.from_bytes(b[o:o + 2], "big")
    end = min(len(b), total)
    o += 2
    out = []
    while o + 4 <= end:
        etype, elen = struct.unpack_from(">HH", b, o)
        data = b[o + 4:o + 4 + elen]
        if len(data) < elen:
            return out, False
        out.append((etype, data))
        o += 4 + elen
    return out, total <= len(b)


def _skip_vector(b: bytes, o: int, width: int) -> int:
    """The offset after a length-prefixed vector at `o`; past len(b) if the capture cut it
    (then there are no extensions to read)."""
    if o + width > len(b):
        return len(b) + 1
    return o + width + int.from_bytes(b[o:o + width], "big")


def client_hello(body: bytes) -> Message:
    """`body`: the handshake message after its 4-byte header."""
    if len(body) < 2:
        raise ParseError("ClientHello cut before its version")
    legacy = int.from_bytes(body[:2], "big")
    o = _skip_vector(body, 34, 1)        # session id
    o = _skip_vector(body, o, 2)         # cipher suites
    o = _skip_vector(body, o, 1)         # compression methods
    sni, offered = None, None
    exts, whole = _extensions(body, o)
    for etype, data in exts:
        if etype == EXT_SNI and len(data) >= 5 and data[2] == 0:
            n = int.from_bytes(data[3:5], "big")
            sni = data[5:5 + n].decode("ascii", "replace") or None
        elif etype == EXT_SUPPORTED_VERSIONS and data:
            offered = [int.from_bytes(data[i:i + 2], "big")
                       for i in range(1, 1 + min(data[0], len(data) - 1) - 1, 2)]
    if offered is None and whole:
        offered = [legacy]           # no supported_versions: the legacy field says it
    msg = Message(True, operation=f"handshake {sni}" if sni else "handshake")
    msg.attributes["tls.protocol.name"] = "tls"
    if sni:
        msg.attributes["tls.client.server_name"] = sni
    known = [v for v in offered or () if v in VERSIONS]
    if known:                        # unknown when the capture cut the extensions
        msg.attributes["deeptrace.tls.client_max_version"] = _version(max(known))
    return msg


def server_hello(body: bytes) -> Message:
    if len(body) < 2:
        raise ParseError("ServerHello cut before its version")
    msg = Message(False)
    version = int.from_bytes(body[:2], "big")
    o = _skip_vector(body, 34, 1)        # session id
    if o + 3 > len(body):
        return msg                       # cut: what was chosen is not known
    cipher = int.from_bytes(body[o:o + 2], "big")
    msg.attributes["tls.cipher"] = CIPHERS.get(cipher, f"0x{cipher:04X}")
    exts, whole = _extensions(body, o + 3)
    for etype, data in exts:
        if etype == EXT_SUPPORTED_VERSIONS and len(data) == 2:
            version, whole = int.from_bytes(data, "big"), True   # TLS 1.3 says so here
    if whole:   # else the extensions that would say TLS 1.3 were cut
        msg.status = _version(version)
        msg.attributes["tls.protocol.version"] = msg.status.removeprefix("TLSv")
    return msg


class TlsHandshakeParser(Parser):
    protocol = "tls"
    stream_cap = 64 * 1024

    def __init__(self):
        super().__init__()
        self.done = {}

    def parse(self, side, stream):
        if self.done.get(side):
            stream.clear()   # ciphertext: never read
            return []
        head = stream.need(5)
        if head is None:
            return []
        if head[0] in (CLIENT_HELLO, SERVER_HELLO) and head[1] == 0:
            # The bare hello: its record's header was read in a call before detection.
            size, start = 4 + int.from_bytes(head[1:4], "big"), 0
        elif head[0] == 22 and head[1] == 3:
            size, start = 5 + (head[3] << 8 | head[4]), 5
        else:
            return self._stop(side, stream)   # not a hello: the start was missed
        if size > 5 + MAX_RECORD:
            return self._stop(side, stream)
        try:
            record = stream.need(size)
        except ParseError:           # the capture cut the hello: read what there is
            record = stream.peek(size)
        if record is None:
            return []
        msg_type = record[start] if len(record) > start + 4 else None
        if msg_type not in (CLIENT_HELLO, SERVER_HELLO):
            return self._stop(side, stream)
        body = record[start + 4:start + 4 + int.from_bytes(record[start + 1:start + 4], "big")]
        msg = client_hello(body) if msg_type == CLIENT_HELLO else server_hello(body)
        stream.consume(size)
        stream.stamp(msg)
        if not start:
            # The record's 5-byte header came just before: count it in, so that both ends
            # place the hello at the same stream position (the peer wrote them as one).
            msg.size += 5
            if msg.seq_start is not None:
                msg.seq_start -= 5
        return [msg] + self._stop(side, stream)

    def _stop(self, side, stream) -> list:
        self.done[side] = True
        stream.clear()
        return []
