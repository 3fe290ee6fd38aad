"""Go crypto/tls end to end: a Go net/http TLS server and client built here with Debian's
Go, the real tls probe (uprobes at the entry and at every `ret` of (*Conn).Write/Read)
beside the real trace probe (the ciphertext syscalls), and the spans stage.

Asserted on both ends: operation, status, role; that each Go write's TCP range is the
range of the ciphertext write under it; that client and server agree on each request's
position (so the spans link by tcp_seq); processes started before and after the probe,
a binary first seen after it; stripped and DWARF-less binaries are reported, not traced.
"""

import json
import logging
import os
import shutil
import subprocess
import time
import types

import pytest

from conftest import require_bpf, start_probe
from deeptrace_core.bpf import kernel_defines
from deeptrace_core.plugins import PluginHost
from deeptrace_core.testing import Server, free_port
from deeptrace_plugins.protocols.stage import SpansConfig, SpanStage
from deeptrace_plugins.tls.probe import TlsConfig, TlsProbe

pytestmark = pytest.mark.bpf

GO_PEER = r"""
package main

import (
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"time"
)

func main() {
	switch os.Args[1] {
	case "server": // server ADDR CERT KEY
		http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/missing" {
				http.NotFound(w, r)
				return
			}
			fmt.Fprintf(w, "hello go %s\n", r.URL.Path)
		})
		err := (&http.Server{Addr: os.Args[2]}).ListenAndServeTLS(os.Args[3], os.Args[4])
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	case "client": // client BASE PATH...: one keep-alive connection, statuses as JSON
		c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
			TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
		var out []int
		for _, p := range os.Args[3:] {
			resp, err := c.Get(os.Args[2] + p)
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(1)
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			out = append(out, resp.StatusCode)
		}
		json.NewEncoder(os.Stdout).Encode(out)
	}
}
"""

HTTP_EXPECTED = [("http1", "GET /ok", "200", False), ("http1", "GET /missing", "404", True)]


def go_build(src_dir, out, *flags):
    """`go build` with the standard library only: no network, caches under src_dir."""
    env = {**os.environ, "GOCACHE": str(src_dir / "cache"), "GOPATH": str(src_dir / "gopath"),
           "GOFLAGS": "-mod=mod", "GOPROXY": "off", "GOTOOLCHAIN": "local",
           "HOME": str(src_dir)}
    subprocess.run(["go", "build", *flags, "-o", str(out), "."], cwd=src_dir, env=env,
                   check=True, capture_output=True, timeout=300)
    return str(out)


@pytest.fixture(scope="module")
def go(tmp_path_factory):
    if shutil.which("go") is None:
        pytest.fail("Go is not installed: scripts/setup.sh installs golang-go")
    d = tmp_path_factory.mktemp("go-peer")
    (d / "main.go").write_text(GO_PEER)
    (d / "go.mod").write_text("module gotlspeer\n\ngo 1.19\n")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(d / "key.pem"), "-out", str(d / "cert.pem"), "-days", "2", "-subj",
                    "/CN=localhost"], check=True, capture_output=True)
    return types.SimpleNamespace(
        dir=d, crt=str(d / "cert.pem"), key=str(d / "key.pem"),
        peer=go_build(d, d / "peer"),
        stripped=go_build(d, d / "peer-stripped", "-ldflags=-s -w"),
        nodwarf=go_build(d, d / "peer-nodwarf", "-ldflags=-w"),
        pie=go_build(d, d / "peer-pie", "-buildmode=pie"))


def test_inspect_finds_version_functions_and_every_ret(go):
    """golang.inspect against independent oracles: `go version` for the buildinfo, and
    binutils' objdump for the `ret` instructions of (*Conn).Write/Read."""
    from deeptrace_plugins.tls import golang
    st = os.stat(go.peer)
    t = golang.inspect(go.peer, go.peer, (st.st_dev, st.st_ino, st.st_mtime_ns))
    assert t is not None and t.problem is None and not t.pie
    want = subprocess.run(["go", "version"], capture_output=True, text=True).stdout.split()[2]
    assert t.version == want
    nm = subprocess.run(["nm", "-S", go.peer], capture_output=True, text=True).stdout
    for fname in (golang.WRITE, golang.READ):
        addr, size = next((int(a, 16), int(n, 16)) for a, n, _, name in
                          (line.split(None, 3) for line in nm.splitlines()
                           if line.endswith(" " + fname)) if name == fname)
        assert t.functions[fname] == addr
        dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn",
                              f"--start-address={addr}", f"--stop-address={addr + size}",
                              go.peer], capture_output=True, text=True, check=True).stdout
        rets = [int(line.split(":")[0], 16) for line in dis.splitlines()
                if line.split("\t")[-1].strip().startswith("ret")]
        assert rets and t.returns[fname] == rets
    assert set(t.offsets) == {"conn", "netfd", "sysfd", "raw_len", "raw_off"}
    assert t.itab != 0
    # A binary without Go's build info is not Go; a stripped one is reported as such.
    assert golang.inspect("/bin/true", "/bin/true", (0, 0, 0)) is None
    st = os.stat(go.stripped)
    s = golang.inspect(go.stripped, go.stripped, (st.st_dev, st.st_ino, st.st_mtime_ns))
    assert s.problem.startswith("stripped") and s.version == want


def go_server(binary, go):
    port = free_port()
    return Server([binary, "server", f"127.0.0.1:{port}", go.crt, go.key], port)


@pytest.fixture(scope="module")
def early(go):
    """A Go server running before the probe attaches."""
    srv = go_server(go.peer, go)
    yield srv
    srv.stop()


class Run:
    def __init__(self, trace, tls, context):
        self.trace, self.tls, self.context = trace, tls, context

    def requests(self, port, client_argv, want=2, timeout=20.0):
        """Run the client against `port`; return (spans, ciphertext records, TLS records)
        once both ends have `want` spans."""
        self.trace.poll(0)
        self.tls.poll(0)
        self.trace.add_ports([port])
        stage = SpanStage(SpansConfig(), self.context)
        spans, cipher, plain = [], [], []

        def drain():
            recs = self.trace.poll(10)
            tls = [r for r in self.tls.poll(10) if port in (r.local_port, r.remote_port)]
            cipher.extend(r for r in recs if r.direction != "none")
            plain.extend(tls)
            spans.extend(s for s in stage.process(recs + tls)
                         if port in (s.local_port, s.remote_port))

        try:
            out = subprocess.run(client_argv, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            self.output = out.stdout
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                drain()
                if len(ops(spans, "client")) >= want and len(ops(spans, "server")) >= want:
                    break
            time.sleep(0.3)
            drain()
        finally:
            self.trace.remove_ports([port])
        return spans, cipher, plain


@pytest.fixture(scope="module")
def run(early):
    require_bpf()
    registry = PluginHost().load_entry_points().registry()
    context = types.SimpleNamespace(registry=registry)
    trace = start_probe(context=context, ports=[1], payload_bytes=64)
    probe = TlsProbe(TlsConfig(payload_bytes=4096))
    try:
        probe.attach(kernel_defines(probe.kernel_fields))
        yield Run(trace, probe, context)
    finally:
        probe.detach()
        trace.detach()


def by_role(spans, role):
    return [s for s in spans if s.role == role]


def l7(spans, role):
    return [s for s in by_role(spans, role) if s.protocol != "tls"]


def ops(spans, role):
    """The L7 spans of one end (the tls handshake spans of the ciphertext left out)."""
    return [(s.protocol, s.operation, s.status, s.error) for s in by_role(spans, role)
            if s.protocol != "tls"]


def client(binary, port):
    return [binary, "client", f"https://127.0.0.1:{port}", "/ok", "/missing"]


def check_http(run, spans, cipher, plain, server_pid, exact_reads=True):
    """exact_reads=False (no DWARF): a server Read served from what the handshake's last
    socket read brought has no syscall of its own, so no TCP range (mapped, not placed)."""
    assert json.loads(run.output) == [200, 404]
    assert ops(spans, "client") == HTTP_EXPECTED
    assert ops(spans, "server") == [(p, o, st, False) for p, o, st, _ in HTTP_EXPECTED]
    assert {s.pid for s in l7(spans, "server")} == {server_pid}
    assert all(s.attributes.get("deeptrace.tls") is True for s in spans if s.protocol != "tls")
    # Only the plaintext made L7 spans: none from the ciphertext of the same connections.
    assert len([s for s in spans if s.protocol != "tls"]) == 4
    # Each Go write covers exactly the TCP range of the ciphertext write under it.
    writes = [r for r in plain if r.direction == "egress"]
    assert len(writes) >= 4  # two requests, two responses
    egress = {(r.pid, r.local_port, r.tcp_seq_start, r.tcp_seq_end)
              for r in cipher if r.direction == "egress"}
    for w in writes:
        assert w.tls and w.syscall.startswith("go_tls")
        assert (w.pid, w.local_port, w.tcp_seq_start, w.tcp_seq_end) in egress, w
        assert w.tcp_seq_end - w.tcp_seq_start > w.bytes  # record header and tag added
    # The request starts where the client's ciphertext write starts, and the server's
    # read of it names the same position, inside a ciphertext read of its own.
    for s in l7(spans, "client"):
        assert any(r.pid == s.pid and r.local_port == s.local_port
                   and r.tcp_seq_start == s.request_seq[0] for r in cipher
                   if r.direction == "egress"), s
    for s in l7(spans, "server"):
        if s.request_seq is None and not exact_reads:
            continue
        assert any(r.pid == s.pid and r.local_port == s.local_port
                   and r.tcp_seq_start <= s.request_seq[0] < r.tcp_seq_end for r in cipher
                   if r.direction == "ingress"), s
    clients = {(s.local_port, s.request_seq[0]) for s in l7(spans, "client")}
    servers = {(s.remote_port, s.request_seq[0]) for s in l7(spans, "server")
               if s.request_seq is not None}
    assert len(clients) == 2
    assert clients == servers if exact_reads else servers <= clients


def test_go_server_started_before_and_client_after_the_probe(run, go, early):
    spans, cipher, plain = run.requests(early.port, client(go.peer, early.port))
    check_http(run, spans, cipher, plain, early.pid)
    assert go.peer in run.tls.go.attached_paths()
    assert run.tls.stats()["go_calls"] >= 8


def test_go_binary_first_seen_after_the_probe_attached(run, go, tmp_path):
    """A copy of the binary (a new inode the probe never saw) is started only now: its
    exec makes the probe attach to it before it serves."""
    binary = str(tmp_path / "late-peer")
    shutil.copy(go.peer, binary)
    assert binary not in run.tls.go.attached_paths()
    srv = go_server(binary, go)
    try:
        deadline = time.monotonic() + 10
        while binary not in run.tls.go.attached_paths() and time.monotonic() < deadline:
            run.tls.poll(50)
        assert binary in run.tls.go.attached_paths()
        spans, cipher, plain = run.requests(srv.port, client(binary, srv.port))
    finally:
        srv.stop()
    check_http(run, spans, cipher, plain, srv.pid)


def test_stripped_go_binary_is_reported_once(run, go, caplog):
    """A stripped server (-s -w: no symbol table, no DWARF) cannot be traced: it is
    reported once as stripped, and only the client's end (not stripped) gives spans."""
    caplog.set_level(logging.WARNING, logger="deeptrace.tls")
    srv = go_server(go.stripped, go)
    try:
        run.tls.rescan(full=True)
        run.tls.rescan(full=True)  # a second look must not report it again
        assert "stripped" in run.tls.go.problems.get(go.stripped, ""), run.tls.go.problems
        spans, _, plain = run.requests(srv.port, client(go.peer, srv.port), timeout=5.0)
    finally:
        srv.stop()
    # (The trace probe says, once, on its own logger, that it reads no goroutines there.)
    reports = [r for r in caplog.records if go.stripped in r.getMessage() and
               r.name == "deeptrace.tls"]
    assert len(reports) == 1 and "stripped" in reports[0].getMessage()
    assert go.stripped not in run.tls.go.attached_paths()
    assert ops(spans, "client") == HTTP_EXPECTED
    assert ops(spans, "server") == []   # at most its handshake span (plugins/protocols/tls)
    assert not [r for r in plain if r.pid == srv.pid]
    assert run.tls.stats()["go_binaries_not_traced"] >= 1


def test_go_binary_without_dwarf_is_mapped_by_the_nested_syscall(run, go):
    """-ldflags=-w: symbols but no DWARF, so no struct offsets; each call takes its socket
    from the read/write syscall made inside it, found by goroutine."""
    srv = go_server(go.nodwarf, go)
    try:
        run.tls.rescan(full=True)
        assert go.nodwarf in run.tls.go.attached_paths()
        before = run.tls.stats()["go_mapped_nested"]
        spans, cipher, plain = run.requests(srv.port, client(go.nodwarf, srv.port))
        after = run.tls.stats()["go_mapped_nested"]
    finally:
        srv.stop()
    check_http(run, spans, cipher, plain, srv.pid, exact_reads=False)
    # Both processes' writes and the reads that moved ciphertext: nested.
    assert after - before >= 4


def test_go_pie_server(run, go):
    """A position-independent executable: its functions' addresses differ per process, so
    each process is registered once the probe has seen its exec."""
    srv = go_server(go.pie, go)
    try:
        deadline = time.monotonic() + 10
        while srv.pid not in run.tls.go.pie_pids and time.monotonic() < deadline:
            run.tls.poll(50)
        assert go.pie in run.tls.go.attached_paths()
        assert srv.pid in run.tls.go.pie_pids
        spans, cipher, plain = run.requests(srv.port, client(go.peer, srv.port))
    finally:
        srv.stop()
    check_http(run, spans, cipher, plain, srv.pid)
