"""Shared fixtures: a real, attached trace probe, real peer processes, the example config
and a file on a real block device.

BPF tests need root, BCC and tracefs. Where they cannot load, they are skipped with the
reason, except under CI=true, where that is a failure: CI must run them.
"""

import contextlib
import json
import os
import subprocess
import sys
import time

import pytest

# gRPC's fork support (on by default) runs atfork handlers in every child this process
# forks once gRPC was used (the OTLP and collector tests): they switch context in the child
# before its exec, which the CPU probe's tests count against /proc's figures of the main
# thread. Children here never use gRPC before exec, so the handlers only disturb.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

# One rule for every suite, the plugin distributions' too (deeptrace_core.testing).
from deeptrace_core.testing import bpf_unavailable_reason, require_bpf  # noqa: F401

CI = os.environ.get("CI") == "true"
HERE = os.path.dirname(__file__)
PEERS = os.path.join(HERE, "peers.py")
NO_SUCH_PID = 0x3FFFFFFF  # compiles the pid filter in; tests add their children at run time

# The example config (trace probe -> jsonl exporter under $OUT) the config and CLI tests load.
EXAMPLE_CONFIG = """\
probes:
  trace:
    comms: [myserver, myclient]
    payload_bytes: 512
exporters:
  jsonl:
    path: ${env:OUT}/records.jsonl
pipelines:
  main:
    probes: [trace]
    exporters: [jsonl]
"""


@pytest.fixture(scope="session")
def bpf_ok():
    require_bpf()


class Tracer:
    """An attached TraceProbe plus everything it has recorded so far."""

    def __init__(self, probe):
        self.probe = probe
        self.records = []
        self.edges = []   # asyncio task edges (the trace probe's, for asyncio processes)

    def drain(self):
        for r in self.probe.poll(10):
            (self.edges if r.kind == "asyncio_task" else self.records).append(r)

    def wait_for(self, pred, timeout=5.0):
        """Poll until pred(records) is true; returns the records."""
        deadline = time.monotonic() + timeout
        while True:
            self.drain()
            if pred(self.records) or time.monotonic() > deadline:
                return self.records
            time.sleep(0.02)

    def of(self, pid):
        return [r for r in self.records if r.pid == pid]


def start_probe(context=None, **config):
    from deeptrace_core.bpf import kernel_defines
    from deeptrace_plugins.trace.probe import TraceConfig, TraceProbe

    probe = TraceProbe(TraceConfig(**config), context)
    probe.attach(kernel_defines(probe.kernel_fields))
    return probe


@pytest.fixture(scope="session")
def tracer(bpf_ok):
    probe = start_probe(pids=[NO_SUCH_PID])
    t = Tracer(probe)
    yield t
    probe.detach()


class Peer:
    """A peers.py process that waits for `go` so its pid can be selected first."""

    def __init__(self, *args):
        self.proc = subprocess.Popen([sys.executable, PEERS, *map(str, args)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid = self.proc.pid

    def go(self):
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def line(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"peer {self.proc.args} exited: {self.proc.wait()}")
        return json.loads(line)

    def finish(self, timeout=10):
        report = self.line()
        assert self.proc.wait(timeout) == 0
        return report


class Script(Peer):
    """`python -c CODE` that waits for `go`, then runs CODE; CODE prints JSON lines."""

    def __init__(self, code):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.stdin.readline()\n" + code],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid = self.proc.pid


def udp_sender(n: int) -> "Script":
    """A process that sends n 100-byte datagrams on one socket, then closes it: the
    probe sees 1 + n + 1 calls (socket, the sends, close)."""
    return Script(f"""
import json, socket
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range({n}):
    u.sendto(b'x' * 100, ('127.0.0.1', 9))
u.close()
print(json.dumps({{}}), flush=True)
""")


def block_device_dir():
    """(directory, whole-disk name) of a candidate test directory on a block device."""
    for d in ("/work", "/tmp", "/var/tmp", os.path.dirname(__file__)):
        try:
            st = os.stat(d)
        except OSError:
            continue
        sys_dev = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
        if not os.path.exists(sys_dev):
            continue                              # tmpfs, overlay, ...: no block device
        real = os.path.realpath(sys_dev)
        if os.path.exists(os.path.join(real, "partition")):
            real = os.path.dirname(real)          # requests are traced on the whole disk
        if os.path.exists(os.path.join(real, "slaves")) and os.listdir(
                os.path.join(real, "slaves")):
            continue                              # dm/md: requests land on other disks
        return d, os.path.basename(real)
    return None, None


@contextlib.contextmanager
def block_device_file(tag: str):
    """(path, whole-disk name) of a file for a test to write on a real block device,
    removed afterwards; where there is none, a failure under CI and a skip elsewhere."""
    d, dev = block_device_dir()
    if d is None:
        if CI:
            pytest.fail("no test directory on a real block device")
        pytest.skip("no test directory on a real block device (all tmpfs/overlay)")
    path = os.path.join(d, f".deeptrace-{tag}-test-{os.getpid()}.bin")
    try:
        yield path, dev
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def synced_write(path: str, n: int):
    """n random bytes written to `path`, on the device before it returns (fsync)."""
    with open(path, "wb") as f:
        f.write(os.urandom(n))
        f.flush()
        os.fsync(f.fileno())
