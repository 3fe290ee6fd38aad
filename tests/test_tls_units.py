"""The tls probe without BPF: its config as the agent validates it, the record decoder
against the C layout, the ELF export reader, path selection, and the spans stage's rule
that TLS ciphertext is never parsed."""

import os
import shutil

import pytest

from deeptrace_core.config import ConfigError, parse_config
from deeptrace_core.plugins import PluginHost
from deeptrace_plugins.protocols.stage import SpansConfig, SpanStage, looks_like_tls
from deeptrace_plugins.tls import decoder, discovery
from deeptrace_plugins.tls.probe import TlsConfig, TlsProbe
from deeptrace_plugins.trace.decoder import SocketRecord

LIBSSL = "/lib/x86_64-linux-gnu/libssl.so.3"


@pytest.fixture(scope="module")
def registry():
    return PluginHost().load_entry_points().registry()


def parse(registry, body):
    text = f"probes:\n  tls:\n{body}\nexporters: {{jsonl: {{path: /dev/null}}}}\n" \
           "pipelines: {main: {probes: [tls], exporters: [jsonl]}}\n"
    return parse_config(text, "agent.yaml", registry.schemas())


def test_config_is_validated_with_file_line_and_key(registry):
    cfg = parse(registry, "    include: [libssl.so.3]\n    exclude: ['/usr/bin/node']")
    tls = cfg.probes["tls"].config
    assert (tls.include, tls.exclude, tls.enabled) == (["libssl.so.3"], ["/usr/bin/node"], True)
    for body, line, key, message in [
        ("    payload_bytes: 9000", 3, "probes.tls.payload_bytes", "<= 8192"),
        ("    include: libssl", 3, "probes.tls.include", "expected a list"),
        ("    enable: true", 3, "probes.tls.enable", "unknown key 'enable'"),
        ("    ringbuf_pages: 1000", 3, "probes.tls.ringbuf_pages", "power of two"),
        ("    rescan_interval: 2d", 3, "probes.tls.rescan_interval", "<= 86400"),
    ]:
        with pytest.raises(ConfigError) as err:
            parse(registry, body)
        e = err.value
        assert (e.line, e.key) == (line, key), str(e)
        assert message in str(e), str(e)


def test_disabled_probe_loads_nothing():
    probe = TlsProbe(TlsConfig(enabled=False))
    assert probe.render({}) == ""
    probe.attach({})
    assert probe.poll(0) == [] and probe.stats() == {}
    probe.detach()


def test_decoder_mirrors_the_c_struct():
    src = open(os.path.join(os.path.dirname(decoder.__file__), "tls.bpf.c")).read()
    body = src[src.index("struct tls_event_t {"):src.index("};", src.index("struct tls_event_t {"))]
    sizes = {"u64": 8, "s64": 8, "u32": 4, "s32": 4, "u16": 2, "u8": 1, "char": 1}
    total = 0
    for line in body.splitlines()[1:]:
        parts = line.split("//")[0].split()
        if len(parts) < 2 or "payload[" in line:
            continue
        n = int(parts[1].split("[")[1].rstrip("];")) if "[" in parts[1] else 1
        total += sizes[parts[0]] * n
    assert total == decoder.HEADER.size == 128
    payload = b"GET / HTTP/1.1\r\n\r\n"
    raw = decoder.HEADER.pack(10, 20, (1 << 62) | 7, 0xdead, len(payload), 42, 43, 5,
                              1000, 1100, len(payload), 2, 443, 50000, decoder.EV_DATA, 4, 1,
                              decoder.F_SEQ, bytes([127, 0, 0, 1]) + bytes(12),
                              bytes([127, 0, 0, 2]) + bytes(12), b"curl") + payload
    rec = decoder.make_decoder()(raw, 0, len(raw))
    assert isinstance(rec, SocketRecord) and rec.tls
    assert (rec.syscall, rec.direction, rec.fd, rec.bytes, rec.payload) == \
        ("SSL_write_ex", "egress", 5, len(payload), payload)
    assert (rec.local_addr, rec.local_port, rec.remote_addr, rec.remote_port) == \
        ("127.0.0.1", 443, "127.0.0.2", 50000)
    assert (rec.tcp_seq_start, rec.tcp_seq_end, rec.comm) == (1000, 1100, "curl")
    close = decoder.make_decoder()(_kind(raw, decoder.EV_CLOSE), 0, 128)
    assert isinstance(close, decoder.Control) and close.conn_id == (1 << 62) | 7
    with pytest.raises(ValueError):
        decoder.make_decoder()(raw[:100], 0, 100)


def _kind(raw, kind):
    """The header with another event kind (the u8 after family and the ports, at 70)."""
    b = bytearray(raw[:128])
    b[70] = kind
    return bytes(b)


def test_elf_exports_are_read_from_dynsym(tmp_path):
    syms = discovery.defined_functions(LIBSSL)
    assert {"SSL_read", "SSL_write", "SSL_read_ex", "SSL_write_ex", "SSL_set_fd",
            "SSL_set_bio", "SSL_free", "SSL_do_handshake", "SSL_CTX_new_ex"} <= set(syms)
    # The same addresses readelf reports.
    out = os.popen(f"readelf -W --dyn-syms {LIBSSL}").read()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 8 and parts[7].split("@")[0] == "SSL_write" and parts[6] != "UND":
            assert int(parts[1], 16) == syms["SSL_write"]
    # A file that only imports SSL_write (curl links libssl) defines none of them.
    assert discovery.defined_functions(shutil.which("curl")) == {}
    notelf = tmp_path / "x"
    notelf.write_bytes(b"#!/bin/sh\n" * 10)
    assert discovery.defined_functions(str(notelf)) == {}


def test_include_exclude_match_path_or_file_name():
    w = discovery.wanted_path
    assert w("/usr/lib/x86_64-linux-gnu/libssl.so.3", [], [])
    assert w("/usr/lib/x86_64-linux-gnu/libssl.so.3", ["libssl.so.*"], [])
    assert not w("/usr/bin/node", ["libssl.so.*"], [])
    assert not w("/usr/bin/node", [], ["/usr/bin/*"])
    assert w("/opt/app/libssl.so.3", ["/opt/*"], ["node"])


def test_scanner_finds_libssl_once_per_inode():
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-c", "import ssl, time; print(1, flush=True); "
                          "time.sleep(30)"], stdout=subprocess.PIPE)
    try:
        p.stdout.readline()
        s = discovery.Scanner()
        found = [t for t in s.scan([p.pid, p.pid]) if t.is_ssl]
        assert [os.path.basename(t.path) for t in found] == ["libssl.so.3"]
        assert found[0].openssl3
        assert s.scan([p.pid]) == []          # seen: never looked at again
        s2 = discovery.Scanner(exclude=["libssl.so.*"])
        assert [t for t in s2.scan([p.pid]) if t.is_ssl] == []
    finally:
        p.kill()
        p.wait()


def rec(payload, direction="ingress", tls=False, conn_id=1, lport=443, rport=5000):
    return SocketRecord(1, 2, 10, 10, "x", 3, "read", direction, "tcp", "ipv4", "127.0.0.1",
                        lport, "127.0.0.1", rport, len(payload), 100, 100 + len(payload),
                        payload, conn_id, tls=tls)


CLIENT_HELLO = bytes.fromhex("1603010200010001fc0303") + bytes(40)
APP_DATA = bytes.fromhex("1703030035") + bytes(53)


def stage_with(registry, *protocols):
    ctx = type("C", (), {"registry": registry})()
    return SpanStage(SpansConfig(protocols=list(protocols)), ctx)


def test_ciphertext_is_never_parsed(registry):
    assert looks_like_tls(CLIENT_HELLO) and looks_like_tls(APP_DATA)
    assert not looks_like_tls(b"GET / HTTP/1.1\r\n")
    assert not looks_like_tls(bytes.fromhex("1703000003") + b"select 1")   # MySQL COM_QUERY
    stage = stage_with(registry, "http1", "redis")
    # Ciphertext that a detector would take for a protocol (a kernel-detected one too).
    hello = rec(CLIENT_HELLO)
    hello.protocol, hello.role = "http1", "server"
    assert stage.process([hello]) == []
    assert stage.counts["tls"]["ciphertext_connections"] == 1
    # A connection the tls probe decrypted: its syscall records are dropped even when
    # their bytes do not look like TLS (the capture began mid-record).
    req = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    plain = [rec(req, tls=True, conn_id=(1 << 62) | 1, lport=8443),
             rec(resp, "egress", tls=True, conn_id=(1 << 62) | 1, lport=8443)]
    spans = stage.process(plain + [rec(req, conn_id=2, lport=8443),
                                   rec(resp, "egress", conn_id=2, lport=8443)])
    assert [(s.role, s.operation, s.status, s.attributes.get("deeptrace.tls"))
            for s in spans] == [("server", "GET /a", "200", True)]
    assert stage.counts["tls"]["ciphertext_connections"] == 2


def hellos(sni="example.test"):
    """A real ClientHello and ServerHello from OpenSSL (Python's ssl over memory BIOs)."""
    import ssl
    import subprocess
    import tempfile
    d = tempfile.mkdtemp()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    f"{d}/k", "-out", f"{d}/c", "-days", "1", "-subj", "/CN=x"],
                   check=True, capture_output=True)
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(f"{d}/c", f"{d}/k")
    cctx = ssl.create_default_context()
    cctx.check_hostname, cctx.verify_mode = False, ssl.CERT_NONE
    ci, co, si, so = (ssl.MemoryBIO() for _ in range(4))
    c = cctx.wrap_bio(ci, co, server_hostname=sni)
    s = sctx.wrap_bio(si, so, server_side=True)
    try:
        c.do_handshake()
    except ssl.SSLWantReadError:
        pass
    ch = co.read()
    si.write(ch)
    try:
        s.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return ch, so.read()


def test_handshake_parser_reads_the_hellos_and_nothing_else():
    from deeptrace_core.l7 import REQ, RESP
    from deeptrace_plugins.protocols.tls.parser import TlsHandshakeParser
    from deeptrace_plugins.protocols.tls.plugin import detect
    ch, sh = hellos()
    assert detect(ch, 5000, 443, "tcp") == 1 and detect(sh, 443, 5000, "tcp") == 2
    assert detect(APP_DATA, 5000, 443, "tcp") == 0 and detect(ch, 53, 5000, "udp") == 0
    for cut in (len(ch), 200, 7):   # whole, cut by the capture, split across calls
        p = TlsHandshakeParser()
        if cut == 7:
            msgs = p.feed(REQ, ch[:7], 7, 1, 2, 100) + p.feed(REQ, ch[7:], len(ch) - 7, 3, 4, 107)
        else:
            msgs = p.feed(REQ, ch[:cut], len(ch), 1, 2, 100)
        (req,) = msgs
        assert req.is_request and req.seq_start == 100
        if cut != 200 or b"example.test" in ch[:200]:
            assert req.operation == "handshake example.test"
            assert req.attributes["tls.client.server_name"] == "example.test"
        if cut != 200:
            assert req.attributes["deeptrace.tls.client_max_version"] == "TLSv1.3"
        # Ciphertext after the hello is dropped unread.
        assert p.feed(REQ, APP_DATA * 3, len(APP_DATA) * 3, 5, 6, 500) == []
    # The hello alone, its record's header read before the connection was detected:
    # placed where the record starts, as the sender's write has it.
    p = TlsHandshakeParser()
    (req,) = p.feed(REQ, ch[5:], len(ch) - 5, 1, 2, 105)
    assert (req.seq_start, req.size, req.operation) == (100, len(ch), "handshake example.test")
    p = TlsHandshakeParser()
    (resp,) = p.feed(RESP, sh, len(sh), 1, 2, 900)
    assert (resp.is_request, resp.status) == (False, "TLSv1.3")
    assert resp.attributes["tls.protocol.version"] == "1.3"
    assert resp.attributes["tls.cipher"].startswith("TLS_")
    # Hellos the capture cut early: spans without what was cut, no error.
    p = TlsHandshakeParser()
    (req,) = p.feed(REQ, ch[:60], len(ch), 1, 2, 100)
    assert (req.operation, p.errors) == ("handshake", 0)
    assert "deeptrace.tls.client_max_version" not in req.attributes
    (resp,) = p.feed(RESP, sh[:50], len(sh), 3, 4, 900)
    assert resp.status is None and "tls.protocol.version" not in resp.attributes
    # A connection whose start was missed: nothing, no error.
    p = TlsHandshakeParser()
    assert p.feed(REQ, APP_DATA, len(APP_DATA), 1, 2, 0) == [] and p.errors == 0


def test_handshake_span_only_where_no_plaintext_came(registry, monkeypatch):
    import deeptrace_plugins.protocols.stage as stage_mod
    ch, sh = hellos()
    stage = stage_with(registry, "http1", "tls")
    monkeypatch.setattr(stage_mod, "TLS_WAIT", 0.0)
    # Connection 1 (port 5001): hellos only. Connection 2 (5002): plaintext follows.
    recs = [rec(ch, "egress", conn_id=1, lport=5001, rport=443),
            rec(sh, "ingress", conn_id=1, lport=5001, rport=443),
            rec(ch, "egress", conn_id=2, lport=5002, rport=443),
            rec(sh, "ingress", conn_id=2, lport=5002, rport=443)]
    stage_mod_wait = stage.process(recs[:2])
    assert [(s.protocol, s.role, s.operation, s.status) for s in stage_mod_wait] == \
        [("tls", "client", "handshake example.test", "TLSv1.3")]
    assert stage_mod_wait[0].attributes["tls.client.server_name"] == "example.test"
    monkeypatch.setattr(stage_mod, "TLS_WAIT", 60.0)
    assert stage.process(recs[2:]) == []        # held: plaintext may follow
    req = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    spans = stage.process([rec(req, "egress", tls=True, conn_id=(1 << 62) | 2, lport=5002,
                               rport=443),
                           rec(resp, "ingress", tls=True, conn_id=(1 << 62) | 2, lport=5002,
                               rport=443)])
    assert [(s.protocol, s.role, s.operation) for s in spans] == [("http1", "client", "GET /a")]
    assert spans[0].attributes["tls.client.server_name"] == "example.test"
    assert spans[0].attributes["tls.protocol.version"] == "1.3"
    assert stage.flush() == []
    assert stage.counts["tls"]["handshakes_decrypted"] == 1


def test_trace_record_budget_is_validated_and_compiled(registry):
    from deeptrace_plugins.trace.probe import TraceConfig, TraceProbe
    with pytest.raises(ValueError, match="not detected in the kernel"):
        TraceConfig(protocols=["http1"], protocol_max_records={"tls": 4})
    with pytest.raises(ValueError, match="1..250"):
        TraceConfig(protocols=["tls"], protocol_max_records={"tls": 0})
    ctx = type("C", (), {"registry": registry})()
    probe = TraceProbe(TraceConfig(protocols=["http1", "tls"], protocol_max_records={"tls": 4}),
                       ctx)
    assert probe.defines()["PROTO_RECORDS_CASES"] == "case 2: return 4;"
    assert "PROTO_RECORDS_CASES" not in TraceProbe(TraceConfig(protocols=["tls"]), ctx).defines()


def test_a_reused_inode_number_is_looked_at_again(tmp_path):
    """A file was seen (not a library) and deleted; its inode number now names a libssl
    that a process maps: the key (device, inode) is the same, the path and file are not."""
    import subprocess
    import sys
    lib = tmp_path / "libssl.so.3"
    shutil.copy(LIBSSL, lib)
    p = subprocess.Popen([sys.executable, "-c", f"import ctypes, time; ctypes.CDLL({str(lib)!r}); "
                          "print(1, flush=True); time.sleep(30)"], stdout=subprocess.PIPE)
    try:
        p.stdout.readline()
        (key,) = [k for k, path in discovery.mapped_files(p.pid) if path == str(lib)]
        s = discovery.Scanner()
        s.seen[key] = ("/tmp/ffiXXXX", (1, 1), None)      # what the deleted file left
        assert [t.path for t in s.scan([p.pid]) if t.is_ssl] == [str(lib)]
        # The same file under another path (a container's view of it): not again.
        s.seen[key] = ("/elsewhere/libssl.so.3", s.seen[key][1], s.seen[key][2])
        assert s.scan([p.pid]) == []
    finally:
        p.kill()
        p.wait()


def _c_enum_ops(path):
    """name -> value of every OP_* enumerator in a C file (implicit values counted on)."""
    import re
    ops = {}
    for body in re.findall(r"enum\s*\{([^}]*)\}", open(path).read()):
        members = [m.strip() for m in body.split(",") if m.strip()]
        if not any(m.startswith("OP_") for m in members):
            continue
        value = -1
        for m in members:
            name, _, init = (p.strip() for p in m.partition("="))
            value = int(init, 0) if init else value + 1
            ops[name] = value
    return ops


def test_op_numbers_mean_one_thing_in_c_and_python():
    here = os.path.dirname(decoder.__file__)
    tls_ops = _c_enum_ops(os.path.join(here, "tls.bpf.c"))
    go_ops = _c_enum_ops(os.path.join(here, "gotls.bpf.c"))
    assert set(tls_ops) == {"OP_READ", "OP_WRITE", "OP_READ_EX", "OP_WRITE_EX", "OP_HANDSHAKE"}
    assert set(go_ops) == {"OP_GO_READ", "OP_GO_WRITE", "OP_GO_HANDSHAKE"}
    both = {**tls_ops, **go_ops}
    assert len(set(both.values())) == len(both), both   # no number used twice
    assert both == decoder.OP_IDS
    # The records' names and directions follow the C names, and no handshake is decoded.
    names = {"OP_READ": "SSL_read", "OP_WRITE": "SSL_write", "OP_READ_EX": "SSL_read_ex",
             "OP_WRITE_EX": "SSL_write_ex", "OP_GO_READ": "go_tls_read",
             "OP_GO_WRITE": "go_tls_write"}
    assert decoder.OPS == {both[c]: py for c, py in names.items()}
    assert decoder.WRITE_OPS == {both[c] for c in both if "WRITE" in c}
    dec = decoder.make_decoder()
    for c_name, value in both.items():
        raw = decoder.HEADER.pack(1, 2, 3, 4, 1, 42, 43, 5, 0, 0, 1, 2, 443, 50000,
                                  decoder.EV_DATA, value, 1, 0, bytes(16), bytes(16),
                                  b"x") + b"a"
        if "HANDSHAKE" in c_name:
            with pytest.raises(ValueError):
                dec(raw, 0, len(raw))
            continue
        rec = dec(raw, 0, len(raw))
        assert rec.syscall == names[c_name]
        assert rec.direction == ("egress" if "WRITE" in c_name else "ingress")


def test_a_tls_handshake_is_not_a_request_the_thread_serves(registry):
    """A server thread's TLS handshake (the ClientHello the kernel detected), still open
    when its decrypted request is staged (another ring), must not mark the thread as an
    event loop: its client calls would lose the linker's thread rule."""
    ch, sh = hellos()
    stage = stage_with(registry, "http1", "tls")
    conn = (1 << 62) | 9
    req = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    spans = stage.process([rec(ch, "ingress", conn_id=9, lport=443, rport=5009),
                           rec(req, "ingress", tls=True, conn_id=conn, lport=443, rport=5009),
                           rec(sh, "egress", conn_id=9, lport=443, rport=5009),
                           rec(resp, "egress", tls=True, conn_id=conn, lport=443, rport=5009)])
    (server,) = [s for s in spans if s.protocol == "http1"]
    assert server.role == "server" and server.operation == "GET /a"
    assert "deeptrace.thread_concurrent" not in server.attributes
    # Two requests read before the first is answered still mark the thread.
    spans = stage.process([rec(req, "ingress", tls=True, conn_id=conn + 1, lport=443,
                               rport=5010),
                           rec(req, "ingress", tls=True, conn_id=conn + 2, lport=443,
                               rport=5011),
                           rec(resp, "egress", tls=True, conn_id=conn + 1, lport=443,
                               rport=5010)])
    assert [s.attributes.get("deeptrace.thread_concurrent") for s in spans] == [True]
