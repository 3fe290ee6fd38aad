"""The tls handshake protocol's detector table (for tests/test_detectors.py, which runs
the kernel detector against its Python mirror); the parser and the stage's handling are
in tests/test_tls_units.py."""

from hypothesis import strategies as st

from deeptrace_core import testing as kit
from deeptrace_core.l7 import REQUEST, RESPONSE
from deeptrace_plugins.protocols.tls.plugin import TlsProtocol

# Heads of real hellos (OpenSSL 3.0: record version 3.1 for the ClientHello, 3.3 after).
CH = bytes.fromhex("16030102000100" "01fc0303") + bytes(32)
SH = bytes.fromhex("160303007a0200" "00760303") + bytes(32)

POSITIVE = [
    (CH, 50000, 443, REQUEST),
    (SH, 443, 50000, RESPONSE),
    (bytes.fromhex("160301002e010000") + bytes.fromhex("2a0301") + bytes(29), 1, 2, REQUEST),
    # The hello alone, its record's header read in a call of its own (OpenSSL does).
    (bytes.fromhex("010001fc0303") + bytes(32), 443, 50000, REQUEST),
    (bytes.fromhex("020000760303") + bytes(32), 50000, 443, RESPONSE),
]
NEGATIVE = [
    (CH, 50000, 53, 0, "udp"),                                   # TCP only
    (bytes.fromhex("1703030035") + bytes(53), 50000, 443, 0),    # application data
    (bytes.fromhex("15030300020230"), 50000, 443, 0),            # alert
    (bytes.fromhex("160303002e0b00002a0303") + bytes(32), 1, 2, 0),   # Certificate
    (bytes.fromhex("16030100100100000c0303") + bytes(32), 1, 2, 0),   # too short a hello
    (bytes.fromhex("160305020001000001fc0303") + bytes(32), 1, 2, 0),  # record version 3.5
    (bytes.fromhex("16030102000100") + bytes(4), 1, 2, 0),       # hello version 0.0
    (CH[:10], 1, 2, 0),                                          # cut before the version
    (b"GET / HTTP/1.1\r\n", 50000, 443, 0),
    (bytes.fromhex("1603030005"), 50000, 443, 0),                # a header alone
    (bytes.fromhex("0b0001fc0303") + bytes(32), 443, 50000, 0),  # bare Certificate
    (bytes.fromhex("010100000303") + bytes(32), 443, 50000, 0),  # length over 2^16
    (bytes.fromhex("010000100303") + bytes(32), 443, 50000, 0),  # too short a hello
    (bytes.fromhex("01000000033a") + b"select 1", 1, 3306, 0),   # MySQL COM_QUERY
]

hello = st.builds(lambda rv, ln, t, hv: bytes([22, 3, rv]) + ln.to_bytes(2, "big") + bytes([t])
                  + bytes(3) + bytes([3, hv]) + bytes(32),
                  st.integers(0, 6), st.integers(0, 20000), st.integers(0, 4), st.integers(0, 6))
bare = st.builds(lambda t, a, b, v: bytes([t, a, b, 0, 3, v]) + bytes(32),
                 st.integers(0, 3), st.integers(0, 2), st.integers(0, 255), st.integers(0, 6))
detect_cases = kit.DetectCases(TlsProtocol, POSITIVE, NEGATIVE, ports=(443, 8443),
                               inputs=st.one_of(hello, bare))
