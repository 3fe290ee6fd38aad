"""The span: one request and its response as one process saw them."""

import functools
import random
import time

import attrs

# Span and trace ids must be unique, not secret (W3C Trace Context asks for randomness,
# not a CSPRNG): os.urandom is a system call per span, getrandbits is not.
_bits = random.SystemRandom().getrandbits(64)
_rng = random.Random(_bits)

# Set by the spans stage on a client span whose process served no request when the call
# began: nothing here can be its parent, so the linker releases it at once (a span held
# for nothing is memory; bench.hostile). The linker takes the mark off.
NO_SERVER_OPEN = "deeptrace.no_server_open"


def new_id(nbytes: int) -> str:
    # | 1: never all zeros (invalid). to_bytes().hex() is faster than an f-string format.
    return (_rng.getrandbits(nbytes * 8) | 1).to_bytes(nbytes).hex()


@attrs.define(slots=True)
class Span:
    start_ns: int                 # wall clock
    end_ns: int
    protocol: str                 # http1, http2, grpc, redis, mysql, postgresql, mongodb, dns, memcached
    role: str                     # client | server: this process's side of the connection
    pid: int
    tid: int
    comm: str
    cmdline: str
    l4: str
    family: str
    local_addr: str
    local_port: int
    remote_addr: str
    remote_port: int
    conn_id: int
    operation: str
    status: str | None
    error: bool
    request_size: int
    response_size: int
    request_seq: tuple | None = None    # TCP stream positions of the request's bytes
    response_seq: tuple | None = None
    attributes: dict = attrs.Factory(dict)
    span_id: str = attrs.Factory(functools.partial(new_id, 8))
    trace_id: str | None = None
    parent_span_id: str | None = None
    link_source: str | None = None      # how the parent was decided (tracing issue)

    kind = "span"

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns

    def to_dict(self) -> dict:
        # Shallow: attrs.asdict walks every value recursively and was a fifth of the
        # agent's CPU at 10k spans/s. The JSON encoders take the tuples as they are.
        return _to_dict(self)

    def line(self) -> str:
        t = time.strftime("%H:%M:%S", time.localtime(self.start_ns / 1e9))
        ms = (self.start_ns // 1_000_000) % 1000
        arrow = "->" if self.role == "client" else "<-"
        flag = " ERROR" if self.error else ""
        return (f"{t}.{ms:03d} {self.role.upper():6} {self.protocol:<10} {self.comm}[{self.pid}] "
                f"{self.operation} status={self.status}{flag} "
                f"{self.duration_ns / 1e6:.3f}ms {self.local_addr}:{self.local_port} {arrow} "
                f"{self.remote_addr}:{self.remote_port} req={self.request_size}B "
                f"resp={self.response_size}B")


# One dict display of every field, compiled once as attrs compiles __init__: a third
# cheaper than building the dict from the names and values.
_to_dict = eval("lambda s: {%s, 'duration_ns': s.end_ns - s.start_ns}" % ", ".join(
    f"{a.name!r}: dict(s.{a.name})" if a.name == "attributes" else f"{a.name!r}: s.{a.name}"
    for a in attrs.fields(Span)))
