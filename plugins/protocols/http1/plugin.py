"""HTTP/1.x protocol plugin: registration and the user-space twin of detect.bpf.c."""

from deeptrace_core.l7 import REQUEST, RESPONSE, ProtocolBase, register_protocols
from deeptrace_plugins.protocols.http1.parser import Http1Parser

METHODS = (b"GET ", b"POST ", b"PUT ", b"DELETE ", b"HEAD ", b"OPTIONS ", b"PATCH ",
           b"CONNECT ", b"TRACE ")


class Http1Protocol(ProtocolBase):
    name = "http1"
    detect_c = ("deeptrace_plugins.protocols.http1", "detect.bpf.c")
    parser_class = Http1Parser

    @staticmethod
    def detect(data: bytes, lport: int = 0, rport: int = 0, l4: str = "tcp") -> int:
        """A known method and a space then a target character -> REQUEST; "HTTP/1.0 " or
        "HTTP/1.1 " and a digit -> RESPONSE. Ports are not used: HTTP runs anywhere."""
        if l4 != "tcp":
            return 0
        for m in METHODS:
            if data.startswith(m):
                # the next byte starts the request target: printable, not a space
                return REQUEST if len(data) > len(m) and 0x21 <= data[len(m)] <= 0x7E else 0
        if data[:9] in (b"HTTP/1.0 ", b"HTTP/1.1 ") and len(data) > 9 and 0x30 <= data[9] <= 0x39:
            return RESPONSE
        return 0


deeptrace_register_protocols = register_protocols(Http1Protocol)
