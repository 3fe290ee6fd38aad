"""The prometheus exporter, scraped over real HTTP with urllib and parsed here (a small
parser of the text exposition format: no prometheus_client needed)."""

import re
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from deeptrace_core.config import ConfigError, parse_config
from deeptrace_core.metrics import GAUGE, HISTOGRAM, SUM, MetricPoint, log2_bounds
from deeptrace_core.span import Span
from deeptrace_plugins.exporters import prometheus as prom
from deeptrace_plugins.exporters.prometheus import PrometheusConfig, PrometheusExporter
from deeptrace_plugins.exporters.red import ServiceRule

T0 = 1_700_000_000_000_000_000


# -- a parser of the text format ----------------------------------------------------------

_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)$")


def _labels(text):
    """{a="x",b="y\\"z"} -> {"a": "x", "b": 'y"z'}, undoing the escapes."""
    out, i = {}, 1
    while text[i] != "}":
        eq = text.index("=", i)
        name = text[i:eq]
        assert re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", name), name
        assert text[eq + 1] == '"'
        j, value = eq + 2, []
        while text[j] != '"':
            if text[j] == "\\":
                value.append({"\\": "\\", '"': '"', "n": "\n"}[text[j + 1]])
                j += 2
            else:
                value.append(text[j])
                j += 1
        out[name] = "".join(value)
        i = j + 1
        if text[i] == ",":
            i += 1
    assert i == len(text) - 1, text
    return out


def parse(text):
    """-> (types {family: type}, helps {family: help}, samples {(name, labels...): value})."""
    types, helps, samples = {}, {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, mtype = line.split(" ", 3)
            assert name not in types, f"TYPE twice for {name}"
            types[name] = mtype
        elif line.startswith("# HELP "):
            _, _, name, text_ = line.split(" ", 3)
            helps[name] = text_
        elif line and not line.startswith("#"):
            m = _SAMPLE.match(line)
            assert m, f"not a sample line: {line!r}"
            name, labels, value = m.groups()
            key = (name, *sorted(_labels(labels).items())) if labels else (name,)
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = float(value)
    return types, helps, samples


def scrape(exp, path=None):
    url = exp.url if path is None else exp.url.replace(exp.config.path, path)
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        return parse(resp.read().decode("utf-8"))


def buckets_of(samples, family, labels):
    """{le: value} of one histogram series."""
    out = {}
    for key, value in samples.items():
        if key[0] == family + "_bucket":
            lbl = dict(key[1:])
            le = lbl.pop("le")
            if tuple(sorted(lbl.items())) == tuple(labels):
                out[le] = value
    return out


@pytest.fixture
def exporter():
    made = []

    def make(**kw):
        kw.setdefault("address", "127.0.0.1:0")
        exp = PrometheusExporter(PrometheusConfig(**kw))
        made.append(exp)
        return exp
    yield make
    for exp in made:
        exp.shutdown()


def span(op="GET /items", **kw):
    fields = dict(start_ns=T0, end_ns=T0 + 1_500_000, protocol="http1", role="server", pid=42,
                  tid=42, comm="myserv", cmdline="/usr/bin/myserv", l4="tcp", family="ipv4",
                  local_addr="127.0.0.1", local_port=80, remote_addr="127.0.0.1",
                  remote_port=5000, conn_id=1, operation=op, status="200", error=False,
                  request_size=1, response_size=2)
    fields.update(kw)
    return Span(**fields)


# -- tests --------------------------------------------------------------------------------

def test_scrape_values_labels_and_buckets(exporter):
    exp = exporter(service_name_rules=[ServiceRule(match="^myserv$", service="shop")])
    tricky = 'say "hi"\\ and\nbye'
    exp.export([
        MetricPoint("process.cpu.time", SUM, "s", 1.25, {"process.pid": 12, "cpu.mode": "user"},
                    "CPU time\nof the process"),
        MetricPoint("process.cpu.time", SUM, "s", 0.5, {"process.pid": 12, "cpu.mode": "system"}),
        MetricPoint("system.memory.usage", GAUGE, "By", 1 << 33, {"state": tricky}),
        MetricPoint("process.memory.utilization", GAUGE, "1", 0.25, {"process.pid": 12}),
        MetricPoint("process.paging.faults", SUM, "{fault}", 7, {}),
        MetricPoint("disk.io.latency", HISTOGRAM, "s", attributes={"disk.device": "sda"},
                    bounds=log2_bounds(1e-4, 3), counts=(1, 0, 5, 2), count=8, sum=0.004),
        object(),   # other record kinds are ignored
    ])
    exp.export([MetricPoint("process.cpu.time", SUM, "s", 2.5,
                            {"process.pid": 12, "cpu.mode": "user"})])      # the latest wins
    exp.export([span(), span(), span(error=True, status="500"),
                span("", protocol="redis", role="client", comm="cli", end_ns=T0 + 50_000)])
    types, helps, s = scrape(exp)

    assert types["process_cpu_time_seconds_total"] == "counter"
    assert helps["process_cpu_time_seconds_total"] == "CPU time\\nof the process"
    assert s["process_cpu_time_seconds_total", ("cpu_mode", "user"), ("process_pid", "12")] == 2.5
    assert s["process_cpu_time_seconds_total", ("cpu_mode", "system"), ("process_pid", "12")] == 0.5
    assert types["system_memory_usage_bytes"] == "gauge"
    assert s["system_memory_usage_bytes", ("state", tricky)] == 1 << 33   # escaped, read back
    assert s["process_memory_utilization_ratio", ("process_pid", "12")] == 0.25
    assert s["process_paging_faults_total",] == 7
    assert types["disk_io_latency_seconds"] == "histogram"
    dev = ("disk_device", "sda")
    buckets = {le: s["disk_io_latency_seconds_bucket", dev, ("le", le)]
               for le in ("0.0001", "0.0002", "0.0004", "+Inf")}
    assert buckets == {"0.0001": 1, "0.0002": 1, "0.0004": 6, "+Inf": 8}   # cumulative
    assert s["disk_io_latency_seconds_count", dev] == 8
    assert s["disk_io_latency_seconds_sum", dev] == 0.004

    # RED metrics of the spans
    srv = (("deeptrace_protocol", "http1"), ("operation", "GET /items"),
           ("service_name", "shop"), ("span_kind", "server"))
    cli = (("deeptrace_protocol", "redis"), ("operation", "redis"),
           ("service_name", "cli"), ("span_kind", "client"))
    assert types["deeptrace_requests_total"] == "counter"
    assert s["deeptrace_requests_total", *srv] == 3 and s["deeptrace_requests_total", *cli] == 1
    assert s["deeptrace_errors_total", *srv] == 1 and s["deeptrace_errors_total", *cli] == 0
    assert types["deeptrace_request_duration_seconds"] == "histogram"
    hist = buckets_of(s, "deeptrace_request_duration_seconds", srv)
    assert hist["0.0008"] == 0 and hist["0.0016"] == 3 and hist["+Inf"] == 3
    assert len(hist) == 22   # 21 log2 bounds from 100 µs, then +Inf
    assert s["deeptrace_request_duration_seconds_count", *srv] == 3
    assert s["deeptrace_request_duration_seconds_sum", *srv] == pytest.approx(0.0045)
    hist = buckets_of(s, "deeptrace_request_duration_seconds", cli)
    assert hist["0.0001"] == 1
    st = exp.stats()
    assert (st["series"], st["points_in"], st["dropped_points"], st["red_series"]) == (6, 7, 0, 2)


def test_bound_to_loopback_by_default(exporter):
    assert PrometheusConfig().address == "127.0.0.1:9464"
    exp = exporter()
    assert exp.address[0] == "127.0.0.1"
    assert exp.server.socket.getsockname()[0] == "127.0.0.1"
    # Not reachable on the host's other addresses.
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.connect(("10.255.255.255", 9))
            own = u.getsockname()[0]
    except OSError:
        own = None
    if own and not own.startswith("127."):
        with pytest.raises(OSError):
            socket.create_connection((own, exp.address[1]), timeout=2).close()


def test_other_paths_404_and_shutdown_stops_the_server(exporter):
    exp = exporter(path="/m")
    assert scrape(exp)[2] == {}
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(exp.url.replace("/m", "/metrics"), timeout=5)
    assert e.value.code == 404
    port = exp.address[1]
    exp.shutdown()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_series_are_bounded_and_expire(exporter):
    exp = exporter(max_series=3, series_ttl=0.3, red_metrics=False)
    exp.export([MetricPoint("m", GAUGE, "", i, {"i": i}) for i in range(5)])
    exp.export([MetricPoint("m", GAUGE, "", 10, {"i": 0})])     # a known series still updates
    _, _, s = scrape(exp)
    assert s == {("m", ("i", "0")): 10, ("m", ("i", "1")): 1, ("m", ("i", "2")): 2}
    assert exp.stats()["dropped_points"] == 2
    time.sleep(0.2)
    exp.export([MetricPoint("m", GAUGE, "", 11, {"i": 1})])
    time.sleep(0.2)
    _, _, s = scrape(exp)                      # i=0 and i=2 not updated for 0.4 s > ttl
    assert s == {("m", ("i", "1")): 11}
    assert exp.stats()["expired_series"] == 2
    exp.export([MetricPoint("m", GAUGE, "", 3, {"i": 3})])     # room again
    assert scrape(exp)[2][("m", ("i", "3"))] == 3
    # A full store makes room by itself when its series went stale, even unscraped.
    exp.export([MetricPoint("m", GAUGE, "", i, {"j": i}) for i in range(1)])
    time.sleep(1.1)
    exp.export([MetricPoint("m", GAUGE, "", 5, {"k": 5})])
    assert scrape(exp)[2] == {("m", ("k", "5")): 5}


def test_red_series_bounded_into_other(exporter):
    exp = exporter(red_max_series=2)
    exp.export([span(f"GET /u/{i}") for i in range(10)])
    _, _, s = scrape(exp)
    ops = {dict(k[1:])["operation"]: v for k, v in s.items() if k[0] == "deeptrace_requests_total"}
    assert ops == {"GET /u/0": 1, "GET /u/1": 1, "other": 8}


def test_scrapes_while_exporting(exporter):
    exp = exporter()
    stop = threading.Event()
    fed, failed = [0], []

    def feed():
        # An exception in a thread does not fail the test by itself: keep it for the
        # assertion below.
        try:
            while not stop.is_set():
                i = fed[0]
                exp.export([MetricPoint("c", SUM, "By", i, {"k": i % 50}), span(f"op{i % 20}")])
                fed[0] += 1
        except BaseException as exc:
            failed.append(exc)

    t = threading.Thread(target=feed)
    t.start()
    try:
        for _ in range(30):
            scrape(exp)
        while not fed[0] and t.is_alive():   # the feeder ran at least once meanwhile
            time.sleep(0.01)
    finally:
        stop.set()
        t.join()
    assert not failed, f"the feeder failed: {failed[0]!r}"
    assert fed[0] > 0


@pytest.mark.parametrize("name, unit, mtype, want", [
    ("process.cpu.time", "s", SUM, "process_cpu_time_seconds_total"),
    ("http.server.request.duration", "s", HISTOGRAM, "http_server_request_duration_seconds"),
    ("system.network.io", "By", SUM, "system_network_io_bytes_total"),
    ("deeptrace.net.rate", "By/s", GAUGE, "deeptrace_net_rate_bytes_per_second"),
    ("system.cpu.utilization", "1", GAUGE, "system_cpu_utilization_ratio"),
    ("requests", "{request}", SUM, "requests_total"),
    ("already_total", "", SUM, "already_total"),
    ("x.latency_seconds", "s", GAUGE, "x_latency_seconds"),
    ("9lives", "", GAUGE, "_9lives"),
    ("a-b..c", "ms", GAUGE, "a_b_c_milliseconds"),
])
def test_metric_names(name, unit, mtype, want):
    assert prom.metric_name(name, unit, mtype) == want


def test_label_names_collide_and_values_escape():
    text = prom.render([MetricPoint("m", GAUGE, "", 1, {"a.b": "x", "a_b": "y", "q": 'a"\\\n'})])
    assert text.splitlines()[-1] == 'm{a_b="x;y",q="a\\"\\\\\\n"} 1'


def test_config_errors_and_port_in_use(exporter):
    schemas = {"probes": {"trace": PrometheusConfig}, "exporters": {"prometheus": PrometheusConfig}}
    with pytest.raises(ConfigError) as e:
        parse_config("probes: {trace: {}}\nexporters:\n  prometheus: {address: localhost}\n"
                     "pipelines: {m: {probes: [trace], exporters: [prometheus]}}\n",
                     "a.yaml", schemas, {})
    assert "is not HOST:PORT" in str(e.value) and e.value.key == "exporters.prometheus"
    first = exporter()
    with pytest.raises(ValueError, match="cannot listen on"):
        PrometheusExporter(PrometheusConfig(address=f"127.0.0.1:{first.address[1]}"))


def _thread_count():
    return threading.active_count()


def test_hostile_clients_are_bounded_and_counted_without_tracebacks(exporter, capfd):
    """Issue 13: 200 half-sent requests started 200 threads that stayed, and each dropped
    client printed a traceback. Now: a fixed pool of threads; drops are counted."""
    exp = exporter()
    before = _thread_count()
    host, port = exp.address
    socks = []
    for _ in range(200):
        s = socket.create_connection((host, port), timeout=5)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")   # never finished
        socks.append(s)
    time.sleep(0.5)
    assert _thread_count() - before <= 1, _thread_count() - before  # no thread per client
    assert exp.stats()["rejected_connections"] > 0   # beyond the pool and its queue
    time.sleep(3)
    assert _thread_count() - before <= 1
    # Clients that vanish mid-request with a reset: counted, no traceback.
    for s in socks:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
    deadline = time.monotonic() + 15
    while True:
        try:
            assert scrape(exp) is not None
            break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            assert time.monotonic() < deadline, "the server never answered again"
            time.sleep(0.2)
    assert exp.stats()["client_errors"] >= 1
    assert _thread_count() - before <= 1
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception occurred" not in err


def test_a_stalled_request_is_timed_out(exporter):
    exp = exporter(request_timeout=0.5)
    s = socket.create_connection(exp.address, timeout=5)
    s.sendall(b"GET /metrics HTTP/1.1\r\n")
    t = time.monotonic()
    assert s.recv(100) == b""         # the server gave up on it and closed
    assert time.monotonic() - t < 2
    s.close()
    assert exp.stats()["client_errors"] == 1
    assert scrape(exp) is not None


def test_request_timeout_is_a_ranged_duration():
    assert PrometheusConfig(request_timeout=2.0).request_timeout == 2.0
    with pytest.raises(ValueError, match="request_timeout"):
        PrometheusConfig(request_timeout=0)
