"""Issue 13 row 5: text from traffic reaches a terminal only through one escaping rule,
deeptrace_core.escape.printable: no terminal escapes, no forged lines."""

import io
import time

from deeptrace_core import traces_cli
from deeptrace_core.escape import printable
from deeptrace_core.metrics import SUM, MetricPoint
from deeptrace_core.span import Span
from deeptrace_plugins.exporters.console import ConsoleConfig, ConsoleExporter, format_summary

REDIS = "SET \x1b]0;OWNED\x07\x1b[2J"
H2_PATH = "GET /\x1b[2J\nFAKE LOG LINE"


def _clean(text):
    """No control character but the line ends; no DEL, no C1."""
    return not any((ord(c) < 0x20 and c != "\n") or 0x7f <= ord(c) <= 0x9f for c in text)


def test_printable_escapes_c0_c1_del_and_newlines_visibly():
    assert printable(REDIS) == "SET \\x1b]0;OWNED\\x07\\x1b[2J"
    assert printable("a\nb\r\tc") == "a\\nb\\r\\tc"
    assert printable("\x00\x7f\x85\x9b") == "\\x00\\x7f\\x85\\x9b"
    assert printable("GET /é ✓ plain") == "GET /é ✓ plain"  # printable text untouched
    assert printable("C:\\x1b") == "C:\\\\x1b"  # a literal backslash cannot fake an escape
    assert printable(42) == "42"


def test_console_span_lines_and_summary_cells_are_escaped(capsys):
    span = Span(1_700_000_000_000_000_000, 1_700_000_000_002_000_000, "http2", "server", 42,
                42, "nginx", "nginx", "tcp", "ipv4", "127.0.0.1", 80, "127.0.0.1", 5000, 1,
                H2_PATH, "200", False, 10, 20)
    exp = ConsoleExporter(ConsoleConfig(summary_interval=1e-9), clock=time.monotonic)
    time.sleep(0.001)
    exp.export([span, MetricPoint("red.requests", SUM, "", 1.0, {"http.route": REDIS})])
    out = capsys.readouterr().out
    assert _clean(out)
    assert "FAKE LOG LINE" in out and not any(
        line.startswith("FAKE") for line in out.splitlines())
    assert "GET /\\x1b[2J\\nFAKE LOG LINE" in out
    assert "\\x1b]0;OWNED\\x07" in out
    text = format_summary([MetricPoint("m\x1b[2J", SUM, "", 1.0, {"k\n": "v\x07"})])
    assert _clean(text) and "m\\x1b[2J" in text and "v\\x07" in text


def _span(**kw):
    base = dict(trace_id="a" * 32, span_id="1", parent_span_id=None, start_ns=10**18,
                end_ns=10**18 + 5000, duration_ns=5000, service="redis", operation=REDIS,
                protocol="redis", role="client", status="ERR\x1b[31m", error=1, pid=7,
                comm="redis")
    base.update(kw)
    return base


def test_traces_cli_list_and_show_are_escaped():
    spans = [_span(), _span(span_id="2", parent_span_id="1", service="web\x1b[2J",
                            operation=H2_PATH, status="\x9b200")]
    shown = traces_cli.render_trace(spans, width=10)
    listed = traces_cli.render_list([dict(trace_id="a" * 32, start_ns=10**18, end_ns=10**18 + 1,
                                          duration_ns=1, spans=2, errors=1, root=spans[1])])
    for text in (shown, listed):
        assert _clean(text), text
        assert "\\x1b[2J" in text
    assert "\\x1b]0;OWNED\\x07" in shown and "ERR\\x1b[31m" in shown and "\\x9b200" in shown
    assert len(shown.splitlines()) == 4  # header, ruler, two spans: no forged line
    out = io.StringIO()
    out.write(traces_cli.render_trace(spans, color=True))  # colour codes are ours only
    assert out.getvalue().count("\x1b]") == 0
