"""Socket addresses as the probes' records carry them: the family's name, the text of a
raw kernel address, and an address with its port as people write it."""

import socket

FAMILIES = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}


def address(family: int, raw: bytes) -> str:
    """The text of a kernel address: its first 4 bytes for AF_INET, all 16 otherwise."""
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    return socket.inet_ntop(socket.AF_INET6, raw)


def endpoint(addr: str, port: int) -> str:
    """``addr:port``, ``[addr]:port`` for an IPv6 address."""
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
