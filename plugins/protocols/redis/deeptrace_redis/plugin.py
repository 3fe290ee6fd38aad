"""The Redis protocol plugin (RESP2/RESP3): detector and parser factory."""

from deeptrace_core.l7 import REQUEST, RESPONSE, ProtocolBase, register_protocols

from .parser import RedisParser

PORT = 6379


def _digit(c):
    return 48 <= c <= 57


def _alpha(c):
    return 97 <= (c | 0x20) <= 122


def _array(p, n, a, b):
    """Mirror of redis_array() in detect.bpf.c (0 / 1 command-like / 2 HELLO reply)."""
    o, q = 1 + a, 1 + a + 3 + b
    if n < q + 3:
        return 0
    if not all(_digit(p[i]) for i in range(1, 1 + a)):
        return 0
    if p[o:o + 3] != b"\r\n$" or not all(_digit(p[o + 3 + i]) for i in range(b)):
        return 0
    if p[q:q + 2] != b"\r\n":
        return 0
    if b == 1 and p[o + 3] == 0x36 and n >= q + 10 and p[q + 2:q + 10] == b"server\r\n":
        return 2
    return 1 if _alpha(p[q + 2]) else 0


def _num_crlf(p, n, start):
    seen = False
    for k in range(24):
        pos = start + k
        if pos + 1 >= 32 or pos + 1 >= n:
            return False
        c = p[pos]
        if k == 0 and c == 0x2D:
            continue
        if _digit(c):
            seen = True
            continue
        return c == 0x0D and p[pos + 1] == 0x0A and seen
    return False


def detect(data: bytes, lport: int, rport: int, l4: str) -> int:
    p = bytes(data[:32])
    n = len(p)
    if l4 != "tcp" or n < 3:
        return 0
    c0 = p[0]
    if c0 in b"*%":
        r = 0
        for a, b in ((1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2)):
            r = r or _array(p, n, a, b)
        if r == 2:
            return RESPONSE
        if r == 1 and c0 == 0x2A:
            return REQUEST
    if PORT not in (lport, rport):
        return 0
    if c0 == 0x2B:
        return RESPONSE if p.startswith((b"+OK\r\n", b"+PONG\r\n", b"+QUEUED\r\n")) else 0
    if c0 == 0x2D:
        return RESPONSE if 65 <= p[1] <= 90 and 65 <= p[2] <= 90 else 0
    if c0 in b"$:*%~>":
        return RESPONSE if _num_crlf(p, n, 1) else 0
    if c0 == 0x5F:
        return RESPONSE if p[1:3] == b"\r\n" else 0
    if c0 == 0x23 and n >= 4:
        return RESPONSE if p[1] in b"tf" and p[2:4] == b"\r\n" else 0
    return 0


class RedisProtocol(ProtocolBase):
    name = "redis"
    detect_c = ("deeptrace_redis", "detect.bpf.c")
    detect = staticmethod(detect)
    parser_class = RedisParser


deeptrace_register_protocols = register_protocols(RedisProtocol)
