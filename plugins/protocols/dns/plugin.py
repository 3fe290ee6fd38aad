"""The DNS protocol plugin (UDP and TCP): detector and parser factory."""

from deeptrace_core.l7 import REQUEST, RESPONSE, ProtocolBase, register_protocols

from .parser import DnsParser

PORT = 53


def header(p: bytes, o: int, port53: bool) -> int:
    """Mirror of dns_header() in detect.bpf.c: a plausible DNS header at p[o:]."""
    if len(p) < o + 13:
        return 0
    f1, f2 = p[o + 2], p[o + 3]
    if f1 & 0x78 or f2 & 0x40:
        return 0
    if p[o + 4] != 0 or p[o + 5] != 1 or p[o + 12] > 63:
        return 0
    if f1 & 0x80:
        return RESPONSE if port53 else 0
    if any(p[o + 6:o + 11]) or p[o + 11] > 2 or f2 & 0x0F:
        return 0
    if not port53 and (f1 & 0x06 or f2 & 0x80 or p[o + 12] == 0):
        return 0
    return REQUEST


def detect(data: bytes, lport: int, rport: int, l4: str) -> int:
    """Port 53 and a plausible header; elsewhere only a strict query (see detect.bpf.c)."""
    port53 = PORT in (lport, rport)
    p = bytes(data[:32])
    if l4 == "udp":
        return header(p, 0, port53)
    if l4 != "tcp":
        return 0
    if len(p) >= 2 and int.from_bytes(p[:2], "big") >= 17:
        r = header(p, 2, port53)
        if r:
            return r
    return header(p, 0, port53)   # the length prefix went in a syscall of its own


class DnsProtocol(ProtocolBase):
    name = "dns"
    detect_c = ("deeptrace_plugins.protocols.dns", "detect.bpf.c")
    detect = staticmethod(detect)
    parser_class = DnsParser     # UDP until the stage calls set_l4("tcp")


deeptrace_register_protocols = register_protocols(DnsProtocol)
