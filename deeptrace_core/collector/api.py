"""The collector's JSON HTTP API (127.0.0.1 by default), which ``deeptrace traces
--collector URL`` and the web UI read:

  GET /api/traces?service=&operation=&min_duration_ns=&errors=1&since_ns=&limit=
  GET /api/traces/<id or unique prefix>      {"trace_id": ..., "spans": [...]}
  GET /api/services                          ["frontend", ...]
  GET /api/map?since_ns=                     [{"source", "target", "calls", "rate", ...}]
  GET /api/stats                             receiver and stitcher counters
  GET /, /search, /trace/<id>, /map, ...     the web UI (deeptrace_core/ui) on these tables
"""

import http.server
import json
import threading
import urllib.parse

from deeptrace_core.ui import server as ui_server

from .query import QueryError

_INT = ("min_duration_ns", "since_ns", "limit")


def start(address, query, stats):
    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = 30

        def do_GET(self):
            url = urllib.parse.urlsplit(self.path)
            if ui_server.handles(url.path):     # the same web UI as `deeptrace ui`
                return ui_server.reply(self, query)
            args = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
            try:
                for k in _INT:
                    if k in args:
                        args[k] = int(args[k])
                if url.path == "/api/traces":
                    body = query.list_traces(
                        service=args.get("service"), operation=args.get("operation"),
                        min_duration_ns=args.get("min_duration_ns", 0),
                        errors=args.get("errors") in ("1", "true"),
                        since_ns=args.get("since_ns"), limit=min(args.get("limit", 20), 1000))
                elif url.path.startswith("/api/traces/"):
                    tid = query.find_trace(urllib.parse.unquote(url.path[len("/api/traces/"):]))
                    body = {"trace_id": tid, "spans": query.load_trace(tid)}
                elif url.path == "/api/services":
                    body = query.services()
                elif url.path == "/api/map":
                    body = query.service_map(args.get("since_ns", 900 * 10**9))
                elif url.path == "/api/stats":
                    body = stats()
                else:
                    return self._reply(404, {"error": f"no such endpoint: {url.path}"})
            except QueryError as exc:
                return self._reply(404, {"error": str(exc)})
            except ValueError as exc:
                return self._reply(400, {"error": f"bad parameter: {exc}"})
            except Exception as exc:          # storage errors: say so, keep serving
                return self._reply(503, {"error": f"storage: {exc}"})
            self._reply(200, body)

        def _reply(self, code, obj):
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    host, _, port = address.rpartition(":")
    server = http.server.ThreadingHTTPServer((host.strip("[]"), int(port)), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="api", daemon=True).start()
    return server, server.server_address[1]
