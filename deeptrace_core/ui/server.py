"""The web UI's HTTP side: the page shell and its two static files, and a JSON API over a
``deeptrace_core.query`` back-end. ``reply(handler, query)`` answers one request on any
``BaseHTTPRequestHandler`` (the collector's API server mounts the UI with it);
``deeptrace ui`` runs a server of its own on the local store.

  /  /search  /trace/<id>  /map  /service/<name>     the page shell (app.js draws the page)
  /static/app.js  /static/app.css  /static/favicon.svg
  /api/ui/search?service=&operation=&text=&min_duration=10ms&errors=1&since=1h
                &start_ns=&end_ns=&offset=&limit=&scatter=1
  /api/ui/trace/<id or unique prefix>     /api/ui/services     /api/ui/operations?service=
  /api/ui/map?window=15m                  /api/ui/edge?source=&target=&window=15m
  /api/ui/service?name=&window=1h&step=1m /api/ui/profile?service=

Nothing from the store is put into HTML here: pages are static, data goes out as JSON
and the script writes it with textContent. The Content-Security-Policy forbids inline
script on top of that.
"""

import argparse
import http.server
import json
import os
import sys
import threading
import time
import urllib.parse

from deeptrace_core.query import NotFound, QueryError
from deeptrace_core.traces_cli import DEFAULT_DB, StoreError, parse_duration

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
FILES = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8",
         "favicon.svg": "image/svg+xml", "index.html": "text/html; charset=utf-8"}
PAGE_PREFIXES = ("/trace/", "/service/")
PAGES = ("/", "/search", "/map")
DEFAULT_PORT = 8787
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; base-uri 'none'; "
                               "form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_cache = {}


def handles(path: str) -> bool:
    """Whether `path` is the UI's (the collector asks before its own 404)."""
    return (path in PAGES or path.startswith(PAGE_PREFIXES) or path.startswith("/static/")
            or path.startswith("/api/ui/"))


def _static(name):
    if name not in _cache:
        with open(os.path.join(STATIC, name), "rb") as f:
            _cache[name] = f.read()
    return _cache[name]


def _duration(args, key, default):
    text = args.get(key) or default
    try:
        return parse_duration(text)
    except argparse.ArgumentTypeError as exc:
        raise ValueError(str(exc)) from None


def _int(args, key, default=None):
    v = args.get(key)
    if v in (None, ""):
        return default
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"{key} must be an integer, not {v!r}") from None


def api(query, path: str, args: dict):
    """The JSON answer to an /api/ui/ request (raises QueryError, ValueError)."""
    route = path[len("/api/ui/"):]
    if route == "search":
        since = args.get("since")
        start_ns = _int(args, "start_ns")
        if since and since != "all":
            start_ns = max(start_ns or 0, time.time_ns() - _duration(args, "since", since))
        return query.search(
            service=args.get("service") or None, operation=args.get("operation") or None,
            text=args.get("text") or None,
            min_duration_ns=_duration(args, "min_duration", "0") if args.get("min_duration")
            else 0, errors=args.get("errors") in ("1", "true", "on"), start_ns=start_ns,
            end_ns=_int(args, "end_ns"), offset=_int(args, "offset", 0),
            limit=_int(args, "limit", 50), scatter=args.get("scatter") == "1")
    if route.startswith("trace/"):
        tid = query.find_trace(urllib.parse.unquote(route[len("trace/"):]))
        spans = query.load_trace(tid)
        if not spans:
            raise NotFound(f"no trace {tid}")
        t0 = min(int(x["start_ns"]) for x in spans)
        for x in spans:   # exact here: JavaScript numbers hold ns since 1970 only to ~256 ns
            x["offset_ns"] = int(x["start_ns"]) - t0
        return {"trace_id": tid, "spans": spans}
    if route == "services":
        return query.services()
    if route == "operations":
        return query.operations(args.get("service") or None)
    window = _duration(args, "window", "15m")
    if route == "map":
        return {"window_ns": window, "edges": query.service_map(window)}
    if route == "edge":
        return query.edge_traces(args.get("source", ""), args.get("target", ""), window,
                                 limit=min(_int(args, "limit", 10), 100))
    if route == "service":
        if not args.get("name"):
            raise ValueError("name is required")
        window = _duration(args, "window", "1h")
        return query.service_red(args["name"], window,
                                 _duration(args, "step", "1m"))
    if route == "profile":
        return query.profile(args.get("service", ""))
    raise NotFound(f"no such endpoint: {path}")


def respond(query, raw_path: str):
    """(status, content type, body) for one GET."""
    url = urllib.parse.urlsplit(raw_path)
    path = url.path
    if path.startswith("/api/ui/"):
        args = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        try:
            body, code = api(query, path, args), 200
        except NotFound as exc:
            body, code = {"error": str(exc)}, 404
        except (QueryError, StoreError) as exc:
            body, code = {"error": str(exc)}, 404
        except ValueError as exc:
            body, code = {"error": f"bad parameter: {exc}"}, 400
        except Exception as exc:           # storage trouble: say so, keep serving
            body, code = {"error": f"storage: {exc}"}, 503
        return code, "application/json", json.dumps(body, default=str).encode()
    if path.startswith("/static/"):
        name = path[len("/static/"):]
        if name in FILES and name != "index.html":
            return 200, FILES[name], _static(name)
        return 404, "text/plain; charset=utf-8", b"not found\n"
    if path in PAGES or path.startswith(PAGE_PREFIXES):
        return 200, FILES["index.html"], _static("index.html")
    return 404, "text/plain; charset=utf-8", b"not found\n"


def reply(handler, query):
    """Answer the GET `handler` holds (any BaseHTTPRequestHandler)."""
    code, ctype, body = respond(query, handler.path)
    handler.send_response(code)
    handler.send_header("Content-Type", ctype)
    handler.send_header("Content-Length", str(len(body)))
    handler.send_header("Cache-Control", "no-store" if ctype == "application/json"
                        else "max-age=60")
    for k, v in SECURITY_HEADERS.items():
        handler.send_header(k, v)
    handler.end_headers()
    handler.wfile.write(body)


def serve(query, host="127.0.0.1", port=DEFAULT_PORT):
    """A threaded server of the UI in the background; returns (server, port)."""
    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = 30

        def do_GET(self):
            reply(self, query)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="ui", daemon=True).start()
    return server, server.server_address[1]


# -- the command ------------------------------------------------------------------------

def add_parser(subparsers):
    p = subparsers.add_parser(
        "ui", help="serve the web UI on the local trace store",
        description="Serve the web UI (search, trace waterfall, service map, service RED "
        "charts) on the local trace store the store exporter writes.")
    p.add_argument("--db", default=DEFAULT_DB, help=f"the store's file (default {DEFAULT_DB})")
    p.add_argument("--address", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"port (default {DEFAULT_PORT}; 0: any free one)")
    p.add_argument("--profiles", default="/var/lib/deeptrace/profiles",
                   help="the cpu probe's profile_dir, for flame graphs")
    return p


def run(args) -> int:
    from deeptrace_core.query import SqliteQuery
    try:
        query = SqliteQuery(args.db, profiles_dir=args.profiles)
    except StoreError as exc:
        print(f"deeptrace: {exc}", file=sys.stderr)
        return 1
    try:
        server, port = serve(query, args.address, args.port)
    except OSError as exc:
        print(f"deeptrace: cannot listen on {args.address}:{args.port}: {exc}", file=sys.stderr)
        return 1
    host = f"[{args.address}]" if ":" in args.address else args.address
    print(f"deeptrace ui: serving http://{host}:{port}/ (store {args.db}; Ctrl-C stops)",
          file=sys.stderr, flush=True)
    done = threading.Event()
    import signal
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    server.shutdown()
    query.close()
    return 0
