"""Runs a protocol plugin's kernel detector (its detect.bpf.c) on given bytes, in the kernel.

The detector is compiled into a small XDP program and executed with BPF_PROG_TEST_RUN on
a synthetic packet whose first 8 bytes carry (lport, rport, l4) and the rest the
payload. This checks that the C compiles, passes the verifier, and agrees with the
plugin's Python ``detect`` mirror. Needs root and BCC (see conftest.require_bpf).
"""

import ctypes
import struct

HEADER = struct.Struct("<HHBxH")  # lport, rport, l4, pad, payload length: 8 bytes
SCRATCH = 64

WRAPPER = r"""
BPF_PERCPU_ARRAY(detect_scratch, struct { u8 b[%(scratch)d]; }, 1);

int run_detect(struct xdp_md *ctx) {
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    if (data + 8 > end)
        return 0;
    u16 lport = *(u16 *)data, rport = *(u16 *)(data + 2);
    u8 l4 = *(u8 *)(data + 4);
    u32 len = *(u16 *)(data + 6);
    u32 zero = 0;
    u8 *buf = (u8 *)detect_scratch.lookup(&zero);
    if (!buf)
        return 0;
    // The packet is padded to 8 + SCRATCH bytes, so this read stays inside it.
    if (bpf_probe_read_kernel(buf, %(scratch)d, (void *)((u64)data + 8)))
        return 0;
    u32 n = len < %(scratch)d ? len : %(scratch)d;
    return %(fn)s(buf, n, lport, rport, l4);
}
"""


class _Attr(ctypes.Structure):  # union bpf_attr, BPF_PROG_TEST_RUN part
    _fields_ = [("prog_fd", ctypes.c_uint32), ("retval", ctypes.c_uint32),
                ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
                ("data_in", ctypes.c_uint64), ("data_out", ctypes.c_uint64),
                ("repeat", ctypes.c_uint32), ("duration", ctypes.c_uint32),
                ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
                ("ctx_in", ctypes.c_uint64), ("ctx_out", ctypes.c_uint64),
                ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32),
                ("batch_size", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)
_SYS_BPF, _BPF_PROG_TEST_RUN = 321, 10


class Detector:
    """A compiled detector: ``Detector(name, c_source)(data, lport, rport, l4) -> 0/1/2``."""

    def __init__(self, name: str, c_source: str):
        from bcc import BPF
        text = c_source + WRAPPER % {"scratch": SCRATCH, "fn": f"detect_{name}"}
        self.bpf = BPF(text=text.encode())
        self.fn = self.bpf.load_func(b"run_detect", BPF.XDP)

    def __call__(self, data: bytes, lport: int = 0, rport: int = 0, l4: int = 1) -> int:
        pkt = HEADER.pack(lport, rport, l4, len(data)) + data
        pkt += bytes(max(0, 8 + SCRATCH - len(pkt)))
        buf = ctypes.create_string_buffer(pkt, len(pkt))
        out = ctypes.create_string_buffer(len(pkt) + 256)
        attr = _Attr(prog_fd=self.fn.fd, data_in=ctypes.addressof(buf),
                     data_size_in=len(pkt), data_out=ctypes.addressof(out),
                     data_size_out=len(out), repeat=1)
        if _libc.syscall(_SYS_BPF, _BPF_PROG_TEST_RUN, ctypes.byref(attr), ctypes.sizeof(attr)):
            raise OSError(ctypes.get_errno(), "BPF_PROG_TEST_RUN")
        return attr.retval

    def close(self):
        self.bpf.cleanup()


# -- what every protocol's detector tests share ---------------------------------------------

def cases(positive, negative):
    """(data, lport, rport, l4, want) of detector table rows (data, lport, rport, want[, l4])."""
    for c in positive + negative:
        yield c[0], c[1], c[2], (c[4] if len(c) > 4 else "tcp"), c[3]


def detector_fixture(protocol_cls):
    """A module-scoped fixture: the protocol's detect.bpf.c compiled and loaded."""
    import importlib.resources

    import pytest

    @pytest.fixture(scope="module")
    def kernel_detector():
        from conftest import require_bpf
        require_bpf()
        pkg, name = protocol_cls.detect_c
        d = Detector(protocol_cls.name,
                     importlib.resources.files(pkg).joinpath(name).read_text())
        yield d
        d.close()
    return kernel_detector


def assert_kernel_matches(kernel_detector, detect, inputs):
    """inputs: (data, lport, rport, l4 as 1 tcp / 2 udp); the kernel detector must give
    what the Python mirror gives, for each."""
    for data, lport, rport, l4 in inputs:
        want = detect(data, lport, rport, "tcp" if l4 == 1 else "udp")
        assert kernel_detector(data, lport, rport, l4) == want, (data, lport, rport, l4)


def mutants(data):
    """Hypothesis strategy: `data` with one of its first 40 bytes changed, then cut."""
    from hypothesis import strategies as st
    return st.tuples(st.integers(0, min(len(data), 40) - 1), st.integers(0, 255),
                     st.integers(1, 64)).map(
        lambda t: (data[:t[0]] + bytes([t[1]]) + data[t[0] + 1:])[:t[2]])


def assert_table_matches(kernel_detector, detect, rows):
    """rows: (data, lport, rport, l4, want); Python and the kernel (which sees at most
    SCRATCH bytes) both give `want` on the first SCRATCH bytes."""
    for data, lport, rport, l4, want in rows:
        data = data[:SCRATCH]
        assert detect(data, lport, rport, l4) == want, (data, lport, rport, l4)
        assert kernel_detector(data, lport, rport, 1 if l4 == "tcp" else 2) == want, \
            (data, lport, rport, l4)


def prefixes(samples):
    """Hypothesis strategy: any prefix of one of `samples`."""
    from hypothesis import strategies as st
    return st.sampled_from(samples).flatmap(
        lambda d: st.integers(0, len(d)).map(lambda i: d[:i]))
