"""The Redis detector, in Python and in the kernel (the kit's DetectorSuite), and the
protocol class."""

import pytest
from hypothesis import strategies as st

from deeptrace_core.l7 import REQUEST, RESPONSE
from deeptrace_core.testing import DetectCases, DetectorSuite
from deeptrace_redis.parser import RedisParser
from deeptrace_redis.plugin import RedisProtocol
from test_redis_parser import encode

POSITIVE = [
    (encode([b"GET", b"k"]), 5555, 6379, REQUEST),
    (encode([b"SET", b"k", b"v"]), 40000, 7000, REQUEST),
    (encode([b"CLIENT", b"SETINFO", b"LIB-NAME", b"redis-py"]), 1, 2, REQUEST),
    (encode([b"x"] * 12), 1, 2, REQUEST),
    (b"*123\r\n$10\r\nMSETabcdef\r\n", 1, 2, REQUEST),
    (b"*14\r\n$6\r\nserver\r\n$5\r\nredis\r\n", 1, 2, RESPONSE),
    (b"%7\r\n$6\r\nserver\r\n$5\r\nredis\r\n", 1, 2, RESPONSE),
    (b"+OK\r\n", 6379, 5555, RESPONSE),
    (b"+PONG\r\n", 5555, 6379, RESPONSE),
    (b"+QUEUED\r\n", 6379, 1, RESPONSE),
    (b"-ERR unknown command\r\n", 6379, 5555, RESPONSE),
    (b"-WRONGTYPE Operation\r\n", 6379, 5555, RESPONSE),
    (b"$5\r\nhello\r\n", 6379, 5555, RESPONSE),
    (b"$-1\r\n", 6379, 5555, RESPONSE),
    (b":1\r\n", 6379, 5555, RESPONSE),
    (b":-123456789012345\r\n", 6379, 5555, RESPONSE),
    (b"*-1\r\n", 6379, 5555, RESPONSE),
    (b"*2\r\n:1\r\n:2\r\n", 6379, 5555, RESPONSE),
    (b"%1\r\n+a\r\n:1\r\n", 6379, 5555, RESPONSE),
    (b"_\r\n", 6379, 5555, RESPONSE),
    (b"#t\r\n", 6379, 5555, RESPONSE),
    (b">3\r\n$7\r\nmessage\r\n", 6379, 5555, RESPONSE),
]
NEGATIVE = [
    (b"+OK\r\n", 5555, 8080, 0),            # a reply alone, not on the Redis port
    (b"-ERR nope\r\n", 110, 5555, 0),       # POP3
    (b"$5\r\nhello\r\n", 1, 2, 0),
    (b":1\r\n", 1, 2, 0),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 5555, 6379, 0),
    (b"PING\r\n", 5555, 6379, 0),           # inline commands are left alone
    (b"*3\r\n$3\r\n\x00\x01\x02", 1, 2, 0),
    (b"*1234\r\n$1\r\nx\r\n", 1, 2, 0),      # too many digits for a plausible command
    (b"*2\r\n$123\r\nx\r\n", 1, 2, 0),
    (b"*2\r\n:1\r\n", 1, 2, 0),
    (encode([b"GET", b"k"]), 5555, 6379, 0, "udp"),
    (b"+OKAY\r\n", 6379, 1, 0),
    (b"-err x\r\n", 6379, 1, 0),
    (b":\r\n", 6379, 1, 0),
    (b"", 6379, 1, 0),
    (b"*", 6379, 1, 0),
    (b"\x16\x03\x01\x00\xa5\x01\x00\x00", 6379, 1, 0),
]


# Fragments of RESP glued at random: near-misses of the detector's checks.
TOKENS = st.lists(st.sampled_from([b"*", b"$", b"%", b":", b"+", b"-", b"1", b"12", b"6",
                                   b"\r\n", b"server", b"OK", b"SET", b"x", b"_", b"#t",
                                   b"-1", b"PONG"]), max_size=10).map(b"".join)


@pytest.fixture(scope="module")
def detect_cases():
    return DetectCases(RedisProtocol, POSITIVE, NEGATIVE, ports=(6379,), inputs=TOKENS)


class TestRedisDetector(DetectorSuite):
    pass


def test_protocol_class():
    proto = RedisProtocol(RedisProtocol.config_class())
    assert proto.name == "redis" and isinstance(proto.parser(), RedisParser)
