"""The MongoDB protocol plugin: kernel detector, Python mirror, parser factory."""

from deeptrace_core.l7 import REQUEST, RESPONSE, ProtocolBase, register_protocols

from .parser import MongoDBParser


def _name(c: int) -> bool:
    return 0x61 <= c <= 0x7a or 0x41 <= c <= 0x5a or c in b"$_"


def detect(data: bytes, lport: int, rport: int, l4: str) -> int:
    """Python mirror of detect.bpf.c (same answers on the same first 32 bytes)."""
    p, n = data[:32], len(data)
    if l4 != "tcp" or n < 21:
        return 0
    size = int.from_bytes(p[0:4], "little")
    response_to = int.from_bytes(p[8:12], "little")
    opcode = int.from_bytes(p[12:16], "little")
    if not 21 <= size <= 48000000:
        return 0
    if opcode == 2013:
        if p[16] & ~3 or p[17] or p[18] & ~1 or p[19]:
            return 0
        if p[20] == 0:
            if n < 27:
                return 0
            body = int.from_bytes(p[21:25], "little")
            if body < 5 or body > size - 21 or p[25] == 0 or \
                    (p[25] > 0x13 and p[25] not in (0x7f, 0xff)) or not _name(p[26]):
                return 0
        elif p[20] != 1:
            return 0
        return REQUEST if response_to == 0 else RESPONSE
    if opcode == 2004:
        if p[16] & 1 or p[17] or p[18] or p[19] or not _name(p[20]):
            return 0
        return REQUEST if response_to == 0 else RESPONSE
    if opcode == 1:
        if p[16] & 0xf0 or p[17] or p[18] or p[19] or n < 36:
            return 0
        return RESPONSE
    return 0


class MongoDBProtocol(ProtocolBase):
    name = "mongodb"
    detect_c = ("deeptrace_plugins.protocols.mongodb", "detect.bpf.c")
    detect = staticmethod(detect)
    parser_class = MongoDBParser


deeptrace_register_protocols = register_protocols(MongoDBProtocol)
