"""The MySQL / MariaDB protocol plugin: kernel detector, Python mirror, parser factory."""

from deeptrace_core.l7 import REQUEST, RESPONSE, ProtocolBase, register_protocols
from deeptrace_plugins.protocols.sql import StatementsConfig, statement_start, text_byte

from .parser import MySQLParser

SCAN = 20   # MYSQL_SCAN in detect.bpf.c: bytes of text checked


def _ident(c: int) -> bool:
    return 0x61 <= c <= 0x7a or 0x41 <= c <= 0x5a or 0x30 <= c <= 0x39 or c in b"_$-"


def detect(data: bytes, lport: int, rport: int, l4: str) -> int:
    """Python mirror of detect.bpf.c (same answers on the same first 32 bytes)."""
    p, n = data[:32], len(data)
    if l4 != "tcp" or n < 5 or p[3] != 0:
        return 0
    size = int.from_bytes(p[:3], "little")
    cmd = p[4]
    if size == 0 or size + 4 < n:
        return 0
    if cmd == 0x0a:
        if size < 40 or size > 1024 or n < 8 or not 0x31 <= p[5] <= 0x39:
            return 0
        for i in range(6, min(n, SCAN)):
            if p[i] == 0:
                break
            if not text_byte(p[i]):
                return 0
        return RESPONSE
    if cmd in (0x03, 0x16):
        if size < 3 or n < 6:
            return 0
        c = p[5]
        if cmd == 0x03 and n >= 8 and c == 0 and p[6] == 1:
            c = p[7]
        elif n >= 7 and not text_byte(p[6]):
            return 0
        if not statement_start(c):
            return 0
        return REQUEST if all(text_byte(p[i]) for i in range(7, min(n, SCAN))) else 0
    if cmd == 0x17:
        if size < 10 or n < 14 or p[9] > 0x0f:
            return 0
        return REQUEST if p[10:14] == b"\x01\x00\x00\x00" else 0
    if cmd == 0x02:
        if size < 2 or size + 4 != n or size > 27:
            return 0
        return REQUEST if all(_ident(c) for c in p[5:min(n, SCAN)]) else 0
    if 3306 not in (lport, rport):
        return 0
    if cmd in (0x0e, 0x01) and size == 1 and n == 5:
        return REQUEST
    if cmd == 0x19 and size == 5 and n == 9:
        return REQUEST
    return 0


class MySQLProtocol(ProtocolBase):
    name = "mysql"
    config_class = StatementsConfig
    detect_c = ("deeptrace_plugins.protocols.mysql", "detect.bpf.c")
    detect = staticmethod(detect)
    parser_class = MySQLParser     # built with max_statements from the config


deeptrace_register_protocols = register_protocols(MySQLProtocol)
