"""``deeptrace traces``: read the local trace store the ``store`` exporter writes.

  deeptrace traces [--db PATH] [--service S] [--operation SUBSTR] [--min-duration 10ms]
                   [--errors] [--since 1h] [--limit 20]
      recent traces, newest first: start time, trace id, span count, total duration,
      error mark, root service and operation
  deeptrace traces show TRACE_ID [--db PATH] [--width 40]
      one trace as a tree of spans (children under their parent), each with role,
      service, protocol, operation, status, duration and a time bar
  ... --collector URL (instead of --db): the same, from a collector's API (stitched
      traces across hosts), e.g. --collector http://127.0.0.1:8686

Filters: --service and --operation select traces with a span of that service whose
operation contains SUBSTR (the same span when both are given; case-insensitive for
ASCII); --min-duration, --errors and --since apply to the whole trace (its first start
to its last end; any span in error; started within the last SINCE). A TRACE_ID may be
abbreviated to any unique prefix.

Wiring into the main parser: ``traces_cli.add_parser(sub)``, then dispatch the
``traces`` command to ``traces_cli.run(args)``. Only the standard library is used.
"""

import argparse
import math
import os
import re
import sqlite3
import sys
import time
from collections import defaultdict

from deeptrace_core.escape import printable

DEFAULT_DB = "/var/lib/deeptrace/traces.db"
BAR_WIDTH = 40
MAX_OPERATION = 60  # characters of an operation shown (SQL texts can be long)

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ns|us|µs|ms|s|m|h|d)?")
_UNIT_NS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 1_000_000_000,
            "m": 60_000_000_000, "h": 3_600_000_000_000, "d": 86_400_000_000_000, None: 1_000_000_000}

_MAX_NS = 100 * 365 * 86_400_000_000_000  # 100 years

SPAN_COLUMNS = ("trace_id", "span_id", "parent_span_id", "start_ns", "end_ns", "duration_ns",
                "service", "operation", "protocol", "role", "status", "error", "pid", "comm")


class StoreError(Exception):
    """The store cannot be read; the message is the one line to show."""


# -- parsing ------------------------------------------------------------------------------

def parse_duration(text: str) -> int:
    """'10ms', '1.5s', '2m', '1h', '7d', '250us' -> nanoseconds; a bare number is seconds."""
    m = _DURATION.fullmatch(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r} (examples: 500us, 10ms, 2s, 5m, 1h, 7d)")
    ns = float(m[1]) * _UNIT_NS[m[2]]
    if not ns <= _MAX_NS:  # inf, or beyond what SQLite's integers hold
        raise argparse.ArgumentTypeError(f"duration {text!r} is out of range (at most 36500d)")
    return round(ns)


def add_parser(subparsers):
    """Add the ``traces`` command (with its ``show`` sub-command) to `subparsers`."""
    p = subparsers.add_parser(
        "traces", help="list and show traces from the local store",
        description="List recent traces from the local trace store (written by the store "
        "exporter), newest first, or show one as a tree.",
        epilog="  deeptrace traces show TRACE_ID   draw one trace as a tree with time bars",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", default=DEFAULT_DB, help=f"the store's file (default {DEFAULT_DB})")
    p.add_argument("--service", help="only traces with a span of this service")
    p.add_argument("--operation", metavar="SUBSTR",
                   help="only traces with a span whose operation contains SUBSTR")
    p.add_argument("--min-duration", type=parse_duration, default=0, metavar="DURATION",
                   help="only traces lasting at least this long (e.g. 10ms)")
    p.add_argument("--errors", action="store_true", help="only traces with an error")
    p.add_argument("--since", type=parse_duration, metavar="DURATION",
                   help="only traces started within this long ago (e.g. 1h)")
    p.add_argument("--limit", type=int, default=20, help="at most this many traces (default 20)")
    p.add_argument("--collector", metavar="URL",
                   help="read a collector's API at URL instead of the local store")
    tsub = p.add_subparsers(dest="traces_command", metavar="{show}")
    s = tsub.add_parser("show", help="draw one trace as a tree with time bars")
    s.add_argument("trace_id", help="the trace id, or a unique prefix of it")
    # SUPPRESS: `traces --db X show ID` keeps X; `traces show ID --db X` sets it.
    s.add_argument("--db", default=argparse.SUPPRESS, help="the store's file")
    s.add_argument("--collector", metavar="URL", default=argparse.SUPPRESS,
                   help="read a collector's API at URL instead of the local store")
    s.add_argument("--width", type=int, default=BAR_WIDTH, help="time bar width in columns")
    return p


# -- reading the store --------------------------------------------------------------------

def open_store(path: str, check_same_thread: bool = True) -> sqlite3.Connection:
    """A read-only connection to the store at `path`, or StoreError with the reason
    (check_same_thread=False: for a server's threads, which serialise their use)."""
    if not os.path.exists(path):
        raise StoreError(f"no trace store at {path} (the store exporter creates it; "
                         "choose another file with --db)")
    try:
        uri = "file:" + _uri_path(os.path.abspath(path)) + "?mode=ro"
        conn = sqlite3.connect(uri, uri=True, timeout=10, check_same_thread=check_same_thread)
        conn.row_factory = sqlite3.Row
        conn.execute("SELECT 1 FROM spans LIMIT 1").fetchall()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read trace store {path}: {exc}") from None
    return conn


def _uri_path(path):
    """`path` for an SQLite URI: anything but unreserved characters and / percent-encoded."""
    return "".join(ch if ch.isascii() and (ch.isalnum() or ch in "/-_.~")
                   else "".join(f"%{b:02X}" for b in ch.encode()) for ch in path)


def list_traces(conn, *, service=None, operation=None, min_duration_ns=0, errors=False,
                since_ns=None, limit=20, now_ns=None) -> list[dict]:
    """Recent traces matching the filters, newest first, with their root span."""
    span_where, span_params = [], []
    if service:
        span_where.append("service = ?")
        span_params.append(service)
    if operation:
        span_where.append("operation LIKE ? ESCAPE '\\'")
        span_params.append("%" + re.sub(r"([%_\\])", r"\\\1", operation) + "%")
    having, having_params = ["MAX(end_ns) - MIN(start_ns) >= ?"], [int(min_duration_ns or 0)]
    if errors:
        having.append("MAX(error) = 1")
    if since_ns is not None:
        cutoff = (time.time_ns() if now_ns is None else now_ns) - since_ns
        span_where.append("start_ns >= ?")  # necessary for the trace's start; uses the index
        span_params.append(cutoff)
        having.append("MIN(start_ns) >= ?")
        having_params.append(cutoff)
    sql = ("SELECT trace_id, MIN(start_ns) AS start_ns, MAX(end_ns) AS end_ns, "
           "COUNT(*) AS spans, SUM(error) AS errors FROM spans")
    if span_where:
        sql += f" WHERE trace_id IN (SELECT trace_id FROM spans WHERE {' AND '.join(span_where)})"
    sql += f" GROUP BY trace_id HAVING {' AND '.join(having)} ORDER BY start_ns DESC LIMIT ?"
    out = []
    for row in conn.execute(sql, [*span_params, *having_params, max(int(limit), 0)]).fetchall():
        t = dict(row)
        t["duration_ns"] = t["end_ns"] - t["start_ns"]
        t["root"] = root_span(conn, t["trace_id"])
        out.append(t)
    return out


def root_span(conn, trace_id) -> dict | None:
    """The trace's earliest span without a stored parent (the longest on a tie)."""
    row = conn.execute(
        f"SELECT {', '.join(SPAN_COLUMNS)} FROM spans s WHERE trace_id = ? AND "
        "(parent_span_id IS NULL OR NOT EXISTS (SELECT 1 FROM spans p WHERE "
        "p.trace_id = s.trace_id AND p.span_id = s.parent_span_id)) "
        "ORDER BY start_ns, duration_ns DESC LIMIT 1", (trace_id,)).fetchone()
    return dict(row) if row else None


def find_trace(conn, trace_id: str) -> str:
    """The full id of the trace `trace_id` names (itself or a unique prefix)."""
    trace_id = trace_id.strip().lower()
    if conn.execute("SELECT 1 FROM spans WHERE trace_id = ? LIMIT 1", (trace_id,)).fetchone():
        return trace_id
    ids = [r[0] for r in conn.execute(
        "SELECT DISTINCT trace_id FROM spans WHERE trace_id >= ? AND trace_id < ? LIMIT 6",
        (trace_id, trace_id + "\x7f"))] if trace_id else []
    if not ids:
        raise StoreError(f"no trace {trace_id} in the store")
    if len(ids) > 1:
        more = ", ..." if len(ids) > 5 else ""
        raise StoreError(f"trace id prefix {trace_id} is ambiguous: "
                         f"{', '.join(ids[:5])}{more}")
    return ids[0]


def load_trace(conn, trace_id: str) -> list[dict]:
    return [dict(r) for r in conn.execute(
        f"SELECT {', '.join(SPAN_COLUMNS)} FROM spans WHERE trace_id = ? "
        "ORDER BY start_ns, rowid", (trace_id,))]


# -- rendering ----------------------------------------------------------------------------

RESET, BOLD, DIM, RED = "\x1b[0m", "\x1b[1m", "\x1b[2m", "\x1b[31m"
PALETTE = ("\x1b[36m", "\x1b[32m", "\x1b[33m", "\x1b[35m", "\x1b[34m", "\x1b[96m",
           "\x1b[92m", "\x1b[93m", "\x1b[95m", "\x1b[94m")
BOX = {"tee": "├─ ", "last": "└─ ", "pipe": "│  ", "space": "   ", "bar": "█", "empty": " ",
       "edge": "|"}
ASCII = {"tee": "|- ", "last": "`- ", "pipe": "|  ", "space": "   ", "bar": "#", "empty": " ",
         "edge": "|"}


def fmt_duration(ns: int) -> str:
    if ns < 1_000:
        return f"{ns}ns"
    if ns < 1_000_000:
        return f"{ns / 1e3:.1f}us"
    if ns < 1_000_000_000:
        return f"{ns / 1e6:.3f}ms"
    if ns < 60_000_000_000:
        return f"{ns / 1e9:.3f}s"
    return f"{ns / 1e9:.1f}s"


def fmt_time(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9)) + \
        f".{(ns // 1_000_000) % 1000:03d}"


def _paint(text, code, color):
    return f"{code}{text}{RESET}" if color and code else text


def _service_colour(service):
    return PALETTE[sum(str(service).encode()) % len(PALETTE)]


def _short(text, n=MAX_OPERATION):
    text = printable(" ".join(str(text).split()))  # one line, whatever the query looked like
    return text if len(text) <= n else text[:n - 3] + "..."


def render_list(traces, *, color=False) -> str:
    if not traces:
        return "no traces match\n"
    lines = [_paint(f"{'START':<23}  {'TRACE ID':<32}  {'SPANS':>5}  {'DURATION':>10}  "
                    f"{'ERR':<5}  ROOT", BOLD, color)]
    for t in traces:
        root = t["root"] or {}
        err = _paint("ERROR", RED, color) if t["errors"] else "     "
        what = f"{printable(root.get('service', '?'))} {_short(root.get('operation') or '')}".rstrip()
        lines.append(f"{fmt_time(t['start_ns']):<23}  {printable(t['trace_id']):<32}  {t['spans']:>5}  "
                     f"{fmt_duration(t['duration_ns']):>10}  {err}  {what}")
    return "\n".join(lines) + "\n"


def bar(start_ns, end_ns, t0, t1, width=BAR_WIDTH, chars=ASCII) -> str:
    """`width` columns, filled where [start_ns, end_ns] falls within [t0, t1] (at least one)."""
    span = max(t1 - t0, 1)
    c0 = min(max(math.floor((start_ns - t0) * width / span), 0), width - 1)
    c1 = min(max(math.ceil((end_ns - t0) * width / span), c0 + 1), width)
    return chars["empty"] * c0 + chars["bar"] * (c1 - c0) + chars["empty"] * (width - c1)


def tree_order(spans) -> list[tuple[tuple, dict, bool]]:
    """(tree prefix, span, orphan) in display order (the prefix: a tuple of "pipe", "space",
    "tee", "last", the keys of BOX/ASCII): depth first, siblings by start time.

    A span whose parent is not in the trace is shown at the top level (orphan=True when it
    names a parent); so are spans caught in a parent cycle, so every span appears once.
    """
    by_id = {s["span_id"]: s for s in spans}
    children, roots = defaultdict(list), []
    for s in spans:
        parent = s.get("parent_span_id")
        if parent and parent != s["span_id"] and parent in by_id:
            children[parent].append(s)
        else:
            roots.append(s)
    key = lambda s: (s["start_ns"], -(s["end_ns"] - s["start_ns"]), s["span_id"])  # noqa: E731
    out, seen = [], set()

    def walk(s, prefix, last, top):
        seen.add(s["span_id"])
        orphan = top and bool(s.get("parent_span_id")) and s["parent_span_id"] not in by_id
        out.append((() if top else (*prefix, "last" if last else "tee"), s, orphan))
        kids = [k for k in sorted(children[s["span_id"]], key=key) if k["span_id"] not in seen]
        below = () if top else (*prefix, "space" if last else "pipe")
        for i, k in enumerate(kids):
            walk(k, below, i == len(kids) - 1, False)

    for r in sorted(roots, key=key):
        walk(r, (), True, True)
    for s in sorted(spans, key=key):  # cycles: nothing led to them
        if s["span_id"] not in seen:
            walk(s, (), True, True)
    return out


def render_trace(spans, *, color=False, width=BAR_WIDTH, chars=ASCII) -> str:
    """The trace as text: a header, then one line per span, bars aligned on the right."""
    if not spans:
        return "empty trace\n"
    t0 = min(s["start_ns"] for s in spans)
    t1 = max(s["end_ns"] for s in spans)
    n_err = sum(1 for s in spans if s["error"])
    header = (f"trace {printable(spans[0]['trace_id'])}  {fmt_time(t0)}  {len(spans)} span"
              f"{'s' if len(spans) != 1 else ''}  {fmt_duration(t1 - t0)}")
    if n_err:
        header += "  " + _paint(f"{n_err} error{'s' if n_err != 1 else ''}", RED, color)
    rows = []
    for prefix, s, orphan in tree_order(spans):
        tree = "".join(chars[token] for token in prefix)
        # Every stored text may come from traffic: printable() keeps it on one line and
        # free of terminal escapes.
        status = "" if s["status"] is None else printable(s["status"])
        text = " ".join(x for x in (
            f"{printable(s['role'] or '?'):<6}", f"{printable(s['service'])}[{s['pid']}]",
            printable(s["protocol"] or "?"), _short(s["operation"] or ""), status,
            "ERROR" if s["error"] else "",
            f"(parent {printable(s['parent_span_id'])} not stored)" if orphan else "") if x)
        rows.append((tree, text, s))
    left = max(len(tree) + len(text) for tree, text, _ in rows)
    dur_w = max(len(fmt_duration(s["end_ns"] - s["start_ns"])) for s in spans)
    lo, hi = fmt_duration(0), fmt_duration(t1 - t0)
    ruler = lo + " " * (width - len(lo) - len(hi)) + hi if len(lo) + len(hi) < width else \
        " " * width
    lines = [_paint(header, BOLD, color),
             f"{'':<{left}}  {'':>{dur_w}}  {chars['edge']}{ruler}{chars['edge']}"]
    for tree, text, s in rows:
        pad = " " * (left - len(tree) - len(text))
        if color:
            text = text.replace("ERROR", _paint("ERROR", RED, True))
            if s["error"] and s["status"] is not None:
                text = text.replace(f" {status} ", f" {_paint(status, RED, True)} ", 1)
        b = bar(s["start_ns"], s["end_ns"], t0, t1, width, chars)
        if color:
            b = _paint(b, RED if s["error"] else _service_colour(s["service"]), True)
        lines.append(f"{_paint(tree, DIM, color)}{text}{pad}  "
                     f"{fmt_duration(s['end_ns'] - s['start_ns']):>{dur_w}}  "
                     f"{chars['edge']}{b}{chars['edge']}")
    return "\n".join(lines) + "\n"


# -- the command --------------------------------------------------------------------------

def _want_color(stream) -> bool:
    return (hasattr(stream, "isatty") and stream.isatty() and "NO_COLOR" not in os.environ
            and os.environ.get("TERM") != "dumb")


def _chars_for(stream):
    try:
        (BOX["tee"] + BOX["last"] + BOX["pipe"] + BOX["bar"]).encode(stream.encoding or "ascii")
        return BOX
    except (UnicodeEncodeError, LookupError, AttributeError):
        return ASCII


class CollectorReader:
    """The collector's JSON API (deeptrace_core/collector/api.py), answering as the
    functions above do on the local store."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def _get(self, path, **params):
        import json
        import urllib.error
        import urllib.parse
        import urllib.request
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v not in (None, False)})
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            try:
                detail = json.loads(exc.read()).get("error", exc.reason)
            except ValueError:
                detail = exc.reason
            raise StoreError(f"collector {self.url}: {detail}") from None
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot read collector {self.url}: {exc}") from None

    def list_traces(self, **kw):
        return self._get("/api/traces", service=kw.get("service"),
                         operation=kw.get("operation"),
                         min_duration_ns=kw.get("min_duration_ns") or None,
                         errors=1 if kw.get("errors") else None, since_ns=kw.get("since_ns"),
                         limit=kw.get("limit"))

    def load(self, trace_id):
        import urllib.parse
        return self._get("/api/traces/" + urllib.parse.quote(trace_id.strip(), safe=""))["spans"]


def run(args) -> int:
    out = sys.stdout
    if getattr(args, "collector", None):
        try:
            reader = CollectorReader(args.collector)
            if getattr(args, "traces_command", None) == "show":
                if args.width < 4:
                    raise StoreError("--width must be at least 4")
                out.write(render_trace(reader.load(args.trace_id), color=_want_color(out),
                                       width=args.width, chars=_chars_for(out)))
            else:
                traces = reader.list_traces(service=args.service, operation=args.operation,
                                            min_duration_ns=args.min_duration,
                                            errors=args.errors, since_ns=args.since,
                                            limit=args.limit)
                out.write(render_list(traces, color=_want_color(out)))
        except StoreError as exc:
            print(f"deeptrace: {exc}", file=sys.stderr)
            return 1
        out.flush()
        return 0
    try:
        conn = open_store(args.db)
        try:
            if getattr(args, "traces_command", None) == "show":
                if args.width < 4:
                    raise StoreError("--width must be at least 4")
                spans = load_trace(conn, find_trace(conn, args.trace_id))
                out.write(render_trace(spans, color=_want_color(out), width=args.width,
                                       chars=_chars_for(out)))
            else:
                traces = list_traces(conn, service=args.service, operation=args.operation,
                                     min_duration_ns=args.min_duration, errors=args.errors,
                                     since_ns=args.since, limit=args.limit)
                out.write(render_list(traces, color=_want_color(out)))
        finally:
            conn.close()
    except StoreError as exc:
        print(f"deeptrace: {exc}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:
        print(f"deeptrace: cannot read trace store {args.db}: {exc}", file=sys.stderr)
        return 1
    out.flush()
    return 0


def main(argv=None) -> int:
    """``python -m deeptrace_core.traces_cli ...``: the command on its own."""
    parser = argparse.ArgumentParser(prog="deeptrace")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
