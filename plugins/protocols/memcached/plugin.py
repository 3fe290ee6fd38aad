"""The memcached protocol plugin (text and binary): detector and parser factory."""

from deeptrace_core.l7 import REQUEST, RESPONSE, ProtocolBase, register_protocols

from .parser import MemcachedParser

PORT = 11211

# Words a text command starts with (all lower case, so HTTP's "GET " never matches).
# These, followed by a key byte, are memcached anywhere; the rest only on port 11211.
KEYED_ANYWHERE = [b"get ", b"gets ", b"gat ", b"gats ", b"set ", b"add ", b"cas ", b"incr ",
                  b"decr ", b"append ", b"prepend ", b"replace "]
KEYED_ON_PORT = [b"delete ", b"touch ", b"mg ", b"ms ", b"md ", b"ma ", b"me "]
BARE_ON_PORT = [b"version\r", b"stats\r\n", b"stats ", b"flush_al", b"quit\r\n", b"mn\r\n"]
REPLY_ANYWHERE = [b"STORED\r\n"]
REPLY_ON_PORT = [b"NOT_STOR", b"EXISTS\r\n", b"NOT_FOUN", b"DELETED\r", b"TOUCHED\r",
                 b"END\r\n", b"OK\r\n", b"VERSION ", b"STAT ", b"ERROR\r\n", b"CLIENT_E",
                 b"SERVER_E", b"HD\r\n", b"HD ", b"EN\r\n", b"VA ", b"NF\r\n", b"NS\r\n",
                 b"EX\r\n", b"MN\r\n"]
# Binary protocol: extras length each opcode's request carries (flush: 0 or 4).
EXTRAS = {**{op: 0 for op in (0x00, 0x04, 0x07, 0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x0E, 0x0F,
                               0x10, 0x14, 0x17, 0x19, 0x1A, 0x20, 0x21, 0x22)},
          **{op: 8 for op in (0x01, 0x02, 0x03, 0x11, 0x12, 0x13)},
          **{op: 20 for op in (0x05, 0x06, 0x15, 0x16)},
          **{op: 4 for op in (0x1B, 0x1C, 0x1D, 0x1E, 0x23, 0x24)},
          0x08: -1, 0x18: -1}
STATUSES = {0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x20, 0x81, 0x82,
            0x83, 0x84, 0x85, 0x86}


def _word(p: bytes) -> int:
    """The first 8 bytes as a little-endian number, zeros past the data (as in C)."""
    return int.from_bytes(p[:8].ljust(8, b"\0"), "little")


def _is(w: int, n: int, s: bytes) -> bool:
    return n >= len(s) and w & ((1 << 8 * len(s)) - 1) == int.from_bytes(s, "little")


def _key_byte(p: bytes, n: int, i: int) -> bool:
    return n > i and 0x20 < p[i] != 0x7F


def _binary(p: bytes, n: int, request: bool) -> bool:
    if n < 24 or p[5] != 0 or p[8] != 0:
        return False
    op, ext = p[1], p[4]
    keylen = p[2] << 8 | p[3]
    body = p[9] << 16 | p[10] << 8 | p[11]
    if op not in EXTRAS or keylen > 250 or body < ext + keylen:
        return False
    if not request:
        return (p[6] << 8 | p[7]) in STATUSES
    want = EXTRAS[op]
    return ext == want or want == -1 and ext in (0, 4)


def detect(data: bytes, lport: int, rport: int, l4: str) -> int:
    p = bytes(data[:32])
    n = len(p)
    if l4 != "tcp" or n < 2:
        return 0
    port = PORT in (lport, rport)
    if p[0] == 0x80:
        return REQUEST if _binary(p, n, True) else 0
    if p[0] == 0x81:
        return RESPONSE if port and _binary(p, n, False) else 0
    w = _word(p)
    for words, need_port in ((KEYED_ANYWHERE, False), (KEYED_ON_PORT, True)):
        for s in words:
            if (port or not need_port) and _is(w, n, s) and _key_byte(p, n, len(s)):
                return REQUEST
    if port and any(_is(w, n, s) for s in BARE_ON_PORT):
        return REQUEST
    if any(_is(w, n, s) for s in REPLY_ANYWHERE) or \
            _is(w, n, b"VALUE ") and _key_byte(p, n, 6):
        return RESPONSE
    if port and any(_is(w, n, s) for s in REPLY_ON_PORT):
        return RESPONSE
    return 0


class MemcachedProtocol(ProtocolBase):
    name = "memcached"
    detect_c = ("deeptrace_plugins.protocols.memcached", "detect.bpf.c")
    detect = staticmethod(detect)
    parser_class = MemcachedParser


deeptrace_register_protocols = register_protocols(MemcachedProtocol)

