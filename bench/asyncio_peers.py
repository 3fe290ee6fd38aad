"""Peers for tests/test_asyncio_linking.py and bench/asynciocost.py, run by the Python
under test (3.11, 3.12).

    asyncio_peers.py backends             two thread-per-request HTTP/1.1 servers (/b, /c)
    asyncio_peers.py front PORT_B PORT_C  an asyncio streams server: GET /a/<id> calls
                                          GET /b/<id> and /c/<id> with gather, over
                                          keep-alive connections pooled per back-end
    asyncio_peers.py threads PORT_B PORT_C the same front thread-per-request (the reference
                                          of bench/runtimes.py): a thread per connection,
                                          /b then /c over its own keep-alive connections
    asyncio_peers.py loop N               N epoll returns between two UDP sends

Run with `python -P` (bench/http.py would shadow the standard library's http). Each prints one JSON line when it is ready (ports, pid, thread), then serves until stdin
closes (front, backends) or, for `loop`, waits for a line on stdin first.
"""

import asyncio
import json
import os
import select
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _handler(body_of):
    """A keep-alive HTTP/1.1 handler answering every GET with body_of(path)."""
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            body = body_of(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass
    return H


def backends():
    H = _handler(lambda path: json.dumps({"path": path}).encode())
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), H) for _ in range(2)]
    for s in servers:
        s.daemon_threads = True
        threading.Thread(target=s.serve_forever, daemon=True).start()
    print(json.dumps({"ports": [s.server_address[1] for s in servers]}), flush=True)
    sys.stdin.read()


async def _read_http(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    n = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            n = int(line.split(b":")[1])
    body = await reader.readexactly(n) if n else b""
    return head.split(b"\r\n", 1)[0].decode(), body


async def front(port_b, port_c):
    pools = {"b": asyncio.Queue(), "c": asyncio.Queue()}
    ports = {"b": port_b, "c": port_c}

    async def call(path, rid):
        pool = pools[path]
        if pool.empty():
            conn = await asyncio.open_connection("127.0.0.1", ports[path])
        else:
            conn = pool.get_nowait()
        r, w = conn
        w.write(f"GET /{path}/{rid} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await w.drain()
        _, body = await _read_http(r)
        pool.put_nowait(conn)
        return body

    async def handle(reader, writer):
        try:
            while True:
                try:
                    line, _ = await _read_http(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                rid = line.split(" ")[1].rsplit("/", 1)[1]
                b, c = await asyncio.gather(call("b", rid), call("c", rid))
                body = b + c
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(json.dumps({"port": server.sockets[0].getsockname()[1],
                      "tid": threading.get_native_id()}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


def threads(port_b, port_c):
    import http.client
    local = threading.local()

    def call(path, port, rid):
        conns = getattr(local, "conns", None) or {}
        local.conns = conns
        if path not in conns:
            conns[path] = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conns[path].request("GET", f"/{path}/{rid}")
        r = conns[path].getresponse()
        return r.read()

    def body_of(path):
        rid = path.rsplit("/", 1)[1]
        return call("b", port_b, rid) + call("c", port_c, rid)

    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(body_of))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(json.dumps({"port": server.server_address[1]}), flush=True)
    sys.stdin.read()


def loop(n):
    """Two UDP sends with exactly n epoll_wait returns between them (poll with timeout
    0 returns at once), on the main thread."""
    ep = select.epoll()
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    print(json.dumps({"tid": threading.get_native_id()}), flush=True)
    sys.stdin.readline()
    u.sendto(b"before", ("127.0.0.1", 9))
    for _ in range(n):
        ep.poll(0)
    u.sendto(b"after", ("127.0.0.1", 9))
    u.close()
    print(json.dumps({"done": True}), flush=True)


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "backends":
        backends()
    elif what == "front":
        asyncio.run(front(int(sys.argv[2]), int(sys.argv[3])))
    elif what == "front-uvloop":   # the same front on uvloop's loop (libuv), _asyncio Tasks
        import uvloop
        uvloop.run(front(int(sys.argv[2]), int(sys.argv[3])))
    elif what == "threads":
        threads(int(sys.argv[2]), int(sys.argv[3]))
    elif what == "loop":
        loop(int(sys.argv[2]))
    else:
        raise SystemExit(f"unknown peer {what!r}")
    os._exit(0)
