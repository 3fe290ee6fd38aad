"""The PostgreSQL protocol plugin: kernel detector, Python mirror, parser factory."""

from deeptrace_core.l7 import REQUEST, RESPONSE, ProtocolBase, register_protocols
from deeptrace_plugins.protocols.sql import StatementsConfig, statement_start, text_byte

from .parser import PostgreSQLParser

SCAN = 24   # PG_SCAN in detect.bpf.c: bytes of text checked


def detect(data: bytes, lport: int, rport: int, l4: str) -> int:
    """Python mirror of detect.bpf.c (same answers on the same first 32 bytes)."""
    p, n = data[:32], len(data)
    if l4 != "tcp" or n < 5:
        return 0
    t = p[0]
    if t == 0:
        if n < 8:
            return 0
        size, code = int.from_bytes(p[0:4], "big"), int.from_bytes(p[4:8], "big")
        if code in (80877103, 80877104) and size == 8 and n == 8:
            return REQUEST
        if code != 196608 or size < n or size > 10000 or size < 9:
            return 0
        if n > 8 and not 0x61 <= p[8] <= 0x7a:
            return 0
        return REQUEST
    size = int.from_bytes(p[1:5], "big")
    if size < 4 or p[1] != 0:
        return 0
    if t == ord("Q"):
        if size < 6 or n < 6 or size + 1 < n or not statement_start(p[5]):
            return 0
        ok = all(text_byte(p[i]) for i in range(5, min(n, SCAN, size)))
        return REQUEST if ok else 0
    if t == ord("P"):
        if size < 8 or n < 8:
            return 0
        state = 0          # 0 in the statement name, 1 after its NUL, 2 query text seen
        for i in range(5, min(n, SCAN, size - 1)):
            c = p[i]
            if c == 0:
                state = state or 1
            elif not text_byte(c):
                return 0
            elif state == 1:
                state = 2
        return REQUEST if state == 2 else 0
    if t == ord("R"):
        if n < 9 or size < 8 or size > 2048 or p[5] or p[6] or p[7]:
            return 0
        code = p[8]
        if code in (0, 2, 3, 7, 9) and size == 8:
            return RESPONSE
        if (code == 5 and size == 12) or (code in (10, 11, 12) and size > 8):
            return RESPONSE
        return 0
    if t == ord("Z"):
        return RESPONSE if size == 5 and n == 6 and p[5] in b"ITE" else 0
    if t == ord("E"):
        if n < 12 or size < 8 or p[5] != ord("S"):
            return 0
        return RESPONSE if p[6:12] in (b"ERROR\0", b"FATAL\0", b"PANIC\0") else 0
    if t == ord("1"):
        return RESPONSE if n >= 10 and size == 4 and p[5:10] == b"2\0\0\0\x04" else 0
    return 0


class PostgreSQLProtocol(ProtocolBase):
    name = "postgresql"
    config_class = StatementsConfig
    detect_c = ("deeptrace_plugins.protocols.postgresql", "detect.bpf.c")
    detect = staticmethod(detect)
    parser_class = PostgreSQLParser     # built with max_statements from the config


deeptrace_register_protocols = register_protocols(PostgreSQLProtocol)
