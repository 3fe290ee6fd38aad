"""HTTP/2 (+gRPC) protocol plugin: registration and the user-space twin of detect.bpf.c."""

from deeptrace_core.l7 import REQUEST, RESPONSE, ProtocolBase, register_protocols
from deeptrace_plugins.protocols.http2.parser import PREFACE, Http2Parser

_SETTINGS_MAX = 96   # 16 parameters: more in a first SETTINGS frame is implausible


class Http2Protocol(ProtocolBase):
    name = "http2"
    detect_c = ("deeptrace_plugins.protocols.http2", "detect.bpf.c")
    parser_class = Http2Parser

    @staticmethod
    def detect(data: bytes, lport: int = 0, rport: int = 0, l4: str = "tcp") -> int:
        """The client preface -> REQUEST; a non-ACK SETTINGS frame on stream 0 (what a
        server sends first) -> RESPONSE; mid-connection (start missed), a HEADERS frame on
        an odd stream whose first HPACK field is an indexed :status -> RESPONSE or an
        indexed :method GET/POST -> REQUEST. Everything else: 0. Ports are not used."""
        if l4 != "tcp" or len(data) < 9:
            return 0
        if data[:24] == PREFACE:
            return REQUEST
        length = int.from_bytes(data[:3], "big")
        ftype, flags = data[3], data[4]
        if data[5] & 0x80:
            return 0
        sid = int.from_bytes(data[5:9], "big")
        if ftype == 4:      # SETTINGS
            if sid or flags or length % 6 or length > _SETTINGS_MAX:
                return 0
            if length and len(data) >= 11 and data[9] == 0 and data[10] == 0:
                return 0    # parameter 0 is not defined
            return RESPONSE
        if ftype == 1:      # HEADERS
            if not sid & 1 or flags & ~0x2D or not 0 < length <= 16384:
                return 0
            off = 9 + (1 if flags & 0x08 else 0) + (5 if flags & 0x20 else 0)
            if len(data) <= off:
                return 0
            if 0x88 <= data[off] <= 0x8E:
                return RESPONSE
            if data[off] in (0x82, 0x83):
                return REQUEST
        return 0


deeptrace_register_protocols = register_protocols(Http2Protocol)
