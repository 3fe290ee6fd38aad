"""TLS servers and clients the TLS tests run as separate processes (the test process is
never traced). Each prints a JSON line when ready or done."""

import asyncio
import http.server
import json
import ssl
import sys
import urllib.error
import urllib.request


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        code = 404 if self.path.startswith("/missing") else 200
        body = b"no\n" if code == 404 else b"hello tls\n"
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        peer = getattr(self.connection, "getpeercert", lambda: None)()
        if peer:  # mTLS: tells the client which certificate the server verified
            cn = dict(x[0] for x in peer["subject"])["commonName"]
            self.send_header("X-Client-CN", cn)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def server_context(cert, key):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx


def threaded_server(port, cert, key):
    s = http.server.HTTPServer(("127.0.0.1", port), Handler)
    s.socket = server_context(cert, key).wrap_socket(s.socket, server_side=True)
    s.serve_forever()


def mtls_server(port, cert, key, client_ca):
    """The threaded server, requiring a client certificate signed by client_ca."""
    ctx = server_context(cert, key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(client_ca)
    s = http.server.HTTPServer(("127.0.0.1", port), Handler)
    s.socket = ctx.wrap_socket(s.socket, server_side=True)
    s.serve_forever()


def mtls_client(port, cert, key, paths):
    """First a connection without a client certificate (the server must refuse it), then
    GET each path with one (http.client); prints [refused, [status, client CN], ...]."""
    import http.client

    def conn(with_cert):
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        if with_cert:
            ctx.load_cert_chain(cert, key)
        return http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)

    c = conn(False)
    try:
        c.request("GET", "/ok")
        c.getresponse().read()
        refused = False
    except (ssl.SSLError, ConnectionError):
        refused = True  # TLS 1.3: the server's alert arrives at the first read
    finally:
        c.close()
    out = [refused]
    for p in paths:
        c = conn(True)
        c.request("GET", p)
        r = c.getresponse()
        r.read()
        out.append([r.status, r.getheader("X-Client-CN")])
        c.close()
    print(json.dumps(out), flush=True)


def header_client(port, path, headers):
    """One GET with extra headers ("Name: value" arguments); prints the status."""
    import http.client
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    c = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    c.request("GET", path, headers=dict(h.split(": ", 1) for h in headers))
    r = c.getresponse()
    r.read()
    print(json.dumps([r.status]), flush=True)


def _insecure():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def chain_server(port, cert, key, kind, next_port):
    """front: GET /a/<id> calls back's /b/<id> over HTTPS; back: GET /b/<id> reads
    dt:<id> from Redis over TLS. Each call on a new connection, from the thread serving
    the request (the linker's thread rule)."""
    import socket

    class Chain(Handler):
        def do_GET(self):
            rid = self.path.rsplit("/", 1)[1]
            if kind == "front":
                with urllib.request.urlopen(f"https://127.0.0.1:{next_port}/b/{rid}",
                                            context=_insecure(), timeout=10) as r:
                    r.read()
            else:
                key_ = f"dt:{rid}".encode()
                with _insecure().wrap_socket(socket.create_connection(
                        ("127.0.0.1", next_port), timeout=10)) as s:
                    s.sendall(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(key_), key_))
                    s.recv(1024)
            body = b"ok\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    s = http.server.HTTPServer(("127.0.0.1", port), Chain)
    s.socket = server_context(cert, key).wrap_socket(s.socket, server_side=True)
    s.serve_forever()


def grpc_server(port, cert, key):
    """A gRPC service over TLS. Run with Debian's python3: its grpcio uses the system
    OpenSSL, while the wheel's BoringSSL exports no SSL_* function to hook."""
    from concurrent import futures

    import grpc

    def say_hello(request, context):
        if request == b"fail":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such greeting")
        return b"hello " + request

    handler = grpc.method_handlers_generic_handler("helloworld.Greeter", {
        "SayHello": grpc.unary_unary_rpc_method_handler(say_hello),
        "SayBye": grpc.unary_unary_rpc_method_handler(lambda r, c: b"bye")})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    with open(cert, "rb") as c, open(key, "rb") as k:
        creds = grpc.ssl_server_credentials([(k.read(), c.read())])
    server.add_secure_port(f"127.0.0.1:{port}", creds)
    server.start()
    server.wait_for_termination()


def grpc_client(port, cert):
    """SayHello, a failing SayHello, SayBye on one TLS channel; prints the results."""
    import grpc
    with open(cert, "rb") as c:
        creds = grpc.ssl_channel_credentials(root_certificates=c.read())
    ch = grpc.secure_channel(f"127.0.0.1:{port}", creds,
                             options=[("grpc.ssl_target_name_override", "localhost")])
    hello = ch.unary_unary("/helloworld.Greeter/SayHello")
    out = [hello(b"first", timeout=10).decode()]
    try:
        hello(b"fail", timeout=10)
    except grpc.RpcError as e:
        out.append(e.code().name)
    out.append(ch.unary_unary("/helloworld.Greeter/SayBye")(b"x", timeout=10).decode())
    ch.close()
    print(json.dumps(out), flush=True)


async def _handle(reader, writer):
    # One HTTP/1.1 request per connection, answered by hand: the asyncio transport
    # (a memory BIO under SSLProtocol) is what is under test.
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        path = head.split(b" ", 2)[1]
        code, body = (404, b"no\n") if path.startswith(b"/missing") else (200, b"hello async\n")
        writer.write(b"HTTP/1.1 %d %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                     % (code, b"OK" if code == 200 else b"Not Found", len(body), body))
        await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


def asyncio_server(port, cert, key):
    async def main():
        server = await asyncio.start_server(_handle, "127.0.0.1", port,
                                            ssl=server_context(cert, key))
        async with server:
            await server.serve_forever()
    asyncio.run(main())


def urllib_client(port, paths):
    """GET each path on its own connection; prints the statuses."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    out = []
    for p in paths:
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}{p}", context=ctx,
                                        timeout=10) as r:
                r.read()
                out.append(r.status)
        except urllib.error.HTTPError as e:
            e.read()
            out.append(e.code)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    what, *args = sys.argv[1:]
    if what == "threaded":
        threaded_server(int(args[0]), args[1], args[2])
    elif what == "asyncio":
        asyncio_server(int(args[0]), args[1], args[2])
    elif what == "client":
        urllib_client(int(args[0]), args[1:])
    elif what == "mtls":
        mtls_server(int(args[0]), *args[1:4])
    elif what == "mtls-client":
        mtls_client(int(args[0]), args[1], args[2], args[3:])
    elif what == "header-client":
        header_client(int(args[0]), args[1], args[2:])
    elif what in ("front", "back"):
        chain_server(int(args[0]), args[1], args[2], what, int(args[3]))
    elif what == "grpc-server":
        grpc_server(int(args[0]), args[1], args[2])
    elif what == "grpc-client":
        grpc_client(int(args[0]), args[1])
