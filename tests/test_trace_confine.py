"""Confinement (issue 16): `probes.trace.netns` and `probes.trace.cgroups` keep an agent to
one "host" of several on a machine, filtered in the kernel. Real namespaces, a real cgroup
v2 directory, real sockets; what is outside must not appear, what is inside must, exactly.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import require_bpf, start_probe
from deeptrace_plugins.trace.probe import TraceConfig, cgroup2_root

pytestmark = pytest.mark.bpf

# On each "go": a TCP exchange of exactly 300 bytes up and 7 down, then a line saying it
# is done (one thread throughout). Waiting for "go" lets the test move it into a cgroup.
EXCHANGE = r"""
import json, socket, sys
while sys.stdin.readline().strip() == "go":
    srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen(1)
    port = srv.getsockname()[1]
    c = socket.create_connection(('127.0.0.1', port)); s, _ = srv.accept()
    c.sendall(b'q' * 300); got = b''
    while len(got) < 300: got += s.recv(4096)
    s.sendall(b'answer!'); c.recv(7)
    c.close(); s.close(); srv.close()
    print(json.dumps({"port": port}), flush=True)
"""


class Exchange:
    def __init__(self, prefix=()):
        self.proc = subprocess.Popen([*prefix, sys.executable, "-c", EXCHANGE],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid = self.proc.pid

    def run(self):
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["port"]

    def stop(self):
        self.proc.stdin.write("end\n")
        self.proc.stdin.flush()
        self.proc.wait(10)


def traffic(probe, pids, want_pid, timeout=5.0):
    """Records of `pids` until want_pid's exchange (300 bytes sent, 300 received) shows."""
    recs, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        recs += [r for r in probe.poll(20) if r.pid in pids]
        mine = [r for r in recs if r.pid == want_pid and r.l4 == "tcp"]
        if sum(r.bytes for r in mine if r.direction == "ingress") >= 307:
            break
    time.sleep(0.2)
    return recs + [r for r in probe.poll(20) if r.pid in pids]


def assert_exchange(recs, pid):
    tcp = [r for r in recs if r.pid == pid and r.l4 == "tcp" and r.bytes > 0]
    assert sum(r.bytes for r in tcp if r.direction == "egress") == 307
    assert sum(r.bytes for r in tcp if r.direction == "ingress") == 307
    assert b"".join(r.payload for r in tcp if r.direction == "egress" and r.bytes == 300) \
        == b"q" * 300


@pytest.fixture
def netns():
    name = f"dtconf{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False)


def test_netns_confines_to_one_namespace(netns):
    require_bpf()
    probe = start_probe(netns=[netns])
    try:
        inside = Exchange(("ip", "netns", "exec", netns))
        outside = Exchange()
        time.sleep(0.3)      # both interpreters up before either sends
        inside.run(), outside.run()
        recs = traffic(probe, {inside.pid, outside.pid}, inside.pid)
        assert_exchange(recs, inside.pid)
        assert not [r for r in recs if r.pid == outside.pid]
        inside.stop(), outside.stop()
    finally:
        probe.detach()


def test_netns_config_errors_name_the_namespace():
    with pytest.raises(ValueError, match="netns 'no-such-ns': No such file"):
        TraceConfig(netns=["no-such-ns"])


@pytest.fixture
def cgroup():
    root = cgroup2_root()
    if root is None:
        pytest.fail("no cgroup v2 hierarchy is mounted (every supported Debian kernel has one)")
    name = f"deeptrace-test-{os.getpid()}"
    os.makedirs(os.path.join(root, name, "child"))
    yield root, name
    for d in (os.path.join(root, name, "child"), os.path.join(root, name)):
        # a cgroup is removed with rmdir once empty (its files cannot be unlinked)
        for _ in range(50):
            try:
                os.rmdir(d)
                break
            except OSError:
                time.sleep(0.1)
    shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def test_cgroups_confine_to_a_cgroup_and_its_children(cgroup):
    require_bpf()
    root, name = cgroup
    probe = start_probe(cgroups=[name])
    try:
        inside, outside = Exchange(), Exchange()
        # The traced process sits in a child of the named cgroup, as a container's do.
        with open(os.path.join(root, name, "child", "cgroup.procs"), "w") as f:
            f.write(str(inside.pid))
        inside.run(), outside.run()
        recs = traffic(probe, {inside.pid, outside.pid}, inside.pid)
        assert_exchange(recs, inside.pid)
        assert not [r for r in recs if r.pid == outside.pid]
        inside.stop(), outside.stop()
    finally:
        probe.detach()


def test_a_thread_moved_into_the_cgroup_is_decided_again(cgroup):
    """The verdict is cached per thread: one that made socket calls outside and then moved
    in (a container's first process) must be traced from then on."""
    require_bpf()
    root, name = cgroup
    probe = start_probe(cgroups=[name])
    try:
        mover = Exchange()
        mover.run()                               # outside: its verdict is "no"
        assert traffic(probe, {mover.pid}, mover.pid, timeout=1.0) == []
        with open(os.path.join(root, name, "cgroup.procs"), "w") as f:
            f.write(str(mover.pid))
        mover.run()                               # the same thread, now inside
        assert_exchange(traffic(probe, {mover.pid}, mover.pid), mover.pid)
        mover.stop()
    finally:
        probe.detach()
