"""DNS parser: one message per datagram over UDP; 2-byte length-prefixed messages over TCP.

Messages are decoded with dnspython (``dns.message.from_wire``). Where the capture cut a
message (a big response), the header and question, which come first, are still read
(``question_only``), and the answer count comes from the header.

The parser must know the transport, which the stage sets before the first feed:

    p = proto.parser(); p.set_l4("tcp")     # "udp" by default

Requests and responses pair by ``key`` = (transaction id, question name, question type):
over UDP one socket may carry many outstanding queries, answered in any order.
"""

import struct

import dns.exception
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype

from deeptrace_core.l7 import Message, ParseError, Parser

HEADER = struct.Struct(">HHHHHH")


def decode(data: bytes, cut: bool) -> Message:
    """A Message from one DNS message's bytes (``cut``: the capture lost its end)."""
    if len(data) < 12:
        raise ParseError("shorter than a DNS header")
    txid, flags, qdcount, ancount, _, _ = HEADER.unpack_from(data)
    opcode = (flags >> 11) & 0xF
    if opcode not in (0, 1, 2, 4, 5, 6) or qdcount > 1:
        raise ParseError("not a plausible DNS header")
    m = None
    if not cut:
        try:
            m = dns.message.from_wire(data)
        except (dns.exception.DNSException, ValueError, KeyError):
            pass   # e.g. TSIG we cannot check, or a record dnspython rejects: header+question
    if m is None:
        try:
            m = dns.message.from_wire(data, question_only=True)
        except (dns.exception.DNSException, ValueError, KeyError):
            raise ParseError("undecodable DNS question") from None
    rcode = m.rcode() if m is not None else flags & 0xF
    name = qtype = None
    if m.question:
        q = m.question[0]
        name, qtype = q.name.to_text(), dns.rdatatype.to_text(q.rdtype)
    op = f"{qtype} {name}" if name else "QUERY"
    if opcode:
        op = dns.opcode.to_text(opcode) + (f" {name}" if name else "")
    is_request = not flags & 0x8000
    msg = Message(is_request, operation=op, key=(txid, name and name.lower(), qtype))
    if name:
        msg.attributes["dns.question.name"] = name.rstrip(".") or "."
        msg.attributes["dns.question.type"] = qtype
    if not is_request:
        msg.status = dns.rcode.to_text(rcode)
        msg.error = rcode != 0
        msg.attributes["dns.answer.count"] = ancount
        msg.attributes["dns.response_code"] = msg.status
    if cut:
        msg.attributes["deeptrace.incomplete"] = True
    return msg


def _decodes(data: bytes, cut: bool) -> bool:
    try:
        decode(data, cut)
        return True
    except ParseError:
        return False


class DnsParser(Parser):
    protocol = "dns"

    def __init__(self, l4: str = "udp"):
        super().__init__()
        self.l4 = l4   # "udp" or "tcp"; the stage calls set_l4 before the first feed
        self._seen = {"req": False, "resp": False}

    def parse(self, side, stream):
        if self.l4 != "tcp":
            return self._datagram(stream)
        if not self._seen[side]:
            # The first message of a side may come without its length: servers often
            # read the 2-byte prefix in a syscall of its own, before the connection was
            # recognised (and so before anything of it was recorded). Then that syscall
            # holds exactly one message, which decodes as it is and not after a prefix.
            if stream.need(14) is None:       # (no DNS message is shorter)
                return []
            self._seen[side] = True
            data, cut = stream.segment_data()
            n = int.from_bytes(data[:2], "big")
            prefixed = 12 <= n <= stream.segment_left() - 2 and \
                _decodes(data[2:2 + n], len(data) < n + 2)
            if not prefixed and _decodes(data, cut):
                return self._datagram(stream)
        return self._tcp(stream)

    @staticmethod
    def _datagram(stream):
        """The rest of one syscall's bytes is one message (UDP: a datagram)."""
        msg = decode(*stream.segment_data())    # ParseError: base drops this syscall
        stream.skip_segment()
        return [stream.stamp(msg)]

    @staticmethod
    def _tcp(stream):
        head = stream.need(2)   # a hole here: ParseError, resync at the next syscall
        if head is None:
            return []
        n = int.from_bytes(head, "big")
        if n < 12:
            raise ParseError("DNS/TCP length below a header")
        if len(stream) < 2 + n:
            return []           # wait until the whole message has moved (captured or not)
        data = stream.peek(2 + n)[2:]
        msg = decode(data, len(data) < n)
        stream.consume(2 + n)
        return [stream.stamp(msg)]
