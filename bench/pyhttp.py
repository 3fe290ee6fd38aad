"""The Python HTTP server of the benchmark: `python -m bench.pyhttp` prints {"port": N}.

The same server as tests/l7_peers.py's `http` (http.server.ThreadingHTTPServer, HTTP/1.1
keep-alive, a 5-byte body), with two differences that matter for a benchmark:

* TCP_NODELAY on accepted sockets (`disable_nagle_algorithm`), as production Python
  servers set it. BaseHTTPRequestHandler writes the headers and the body in two writes;
  without it the body waits for the client's delayed ACK, and every request takes
  ~40 ms whatever else happens (the figure would measure Nagle, not the server);
* its threads are named `dtb-pyhttp` (prctl), so the agent's `comms` filter selects it
  and nothing else written in Python on the machine.
"""

import ctypes
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMM = "dtb-pyhttp"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_GET(self):
        body = b"hello"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass

    def handle(self):
        try:
            super().handle()
        except ConnectionError:
            pass  # the load generator closes its connections at the end of a run


def main():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(15, COMM.encode(), 0, 0, 0)  # PR_SET_NAME; threads started later inherit it
    ThreadingHTTPServer.daemon_threads = True
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(json.dumps({"port": server.server_address[1]}), flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
