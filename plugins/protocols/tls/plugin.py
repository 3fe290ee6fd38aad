"""The TLS handshake protocol plugin: an L4 `tls` span per connection from its ClientHello
and ServerHello (server name, version, cipher), for connections whose plaintext the tls
probe cannot read. Ciphertext after the hellos is never parsed: the parser reads the two
hellos and drops everything else."""

from deeptrace_core.l7 import REQUEST, RESPONSE, ProtocolBase, register_protocols

from .parser import TlsHandshakeParser


def detect(data: bytes, lport: int, rport: int, l4: str) -> int:
    """Mirror of detect_tls() in detect.bpf.c: a hello in a handshake record, or the bare
    hello message that starts a read after the record's header was read alone."""
    p = bytes(data[:11])
    if l4 != "tcp" or len(p) < 11:
        return 0
    if p[0] == 22:
        if p[1] != 3 or p[2] > 4 or p[9] != 3 or p[10] > 4 or not 38 <= (p[3] << 8 | p[4]) <= 18432:
            return 0
        kind = p[5]
    else:
        if p[1] != 0 or p[4] != 3 or p[5] > 4 or (p[2] << 8 | p[3]) < 34:
            return 0
        kind = p[0]
    return {1: REQUEST, 2: RESPONSE}.get(kind, 0)


class TlsProtocol(ProtocolBase):
    name = "tls"
    detect_c = ("deeptrace_plugins.protocols.tls", "detect.bpf.c")
    detect = staticmethod(detect)
    parser_class = TlsHandshakeParser


deeptrace_register_protocols = register_protocols(TlsProtocol)
