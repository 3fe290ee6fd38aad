"""Servers written for the L7 end-to-end tests where no Debian package exists or a
Python peer is the point: a gRPC service, a DNS server (UDP and TCP), a Python HTTP
server, and a MongoDB OP_MSG responder (MongoDB cannot be installed here, so pymongo
talks to this stand-in, which answers just enough of the wire protocol).

    python l7_peers.py grpc|dns|http|mongo   prints {"port": N}, serves until killed
"""

import json
import socket
import socketserver
import struct
import sys
import threading

from deeptrace_core.testing import messages


def grpc_server():
    from concurrent import futures

    import grpc

    def say_hello(request, context):
        if request == b"fail":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such greeting")
        return b"hello " + request

    def say_bye(request, context):
        return b"bye"

    handler = grpc.method_handlers_generic_handler("helloworld.Greeter", {
        "SayHello": grpc.unary_unary_rpc_method_handler(say_hello),
        "SayBye": grpc.unary_unary_rpc_method_handler(say_bye)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(json.dumps({"port": port}), flush=True)
    server.wait_for_termination()


def dns_server():
    import dns.message
    import dns.rcode
    import dns.rrset

    def answer(wire):
        q = dns.message.from_wire(wire)
        r = dns.message.make_response(q)
        name = q.question[0].name.to_text()
        if name.startswith("known."):
            r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", "10.1.2.3"))
        else:
            r.set_rcode(dns.rcode.NXDOMAIN)
        return r.to_wire()

    # Port 53 (on 127.0.0.53, clear of any local resolver): DNS is recognised by its port
    # plus a plausible header, as it is in the wild.
    host = "127.0.0.53"
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((host, 53))
    port = udp.getsockname()[1]

    class TCPHandler(socketserver.BaseRequestHandler):
        def handle(self):
            for _, body in messages(self.request, 2, lambda head: struct.unpack("!H", head)[0]):
                out = answer(body)
                self.request.sendall(struct.pack("!H", len(out)) + out)

    socketserver.ThreadingTCPServer.allow_reuse_address = True
    tcp = socketserver.ThreadingTCPServer((host, port), TCPHandler)
    threading.Thread(target=tcp.serve_forever, daemon=True).start()
    print(json.dumps({"port": port}), flush=True)
    while True:
        wire, peer = udp.recvfrom(4096)
        udp.sendto(answer(wire), peer)


def http_server():
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            body = b"x" * (5000 if self.path.startswith("/big") else 5)
            code = 500 if self.path.startswith("/boom") else 200
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            n = int(self.headers.get("Content-Length", 0))
            self.rfile.read(n)
            self.send_response(201)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(json.dumps({"port": server.server_address[1]}), flush=True)
    server.serve_forever()


def mongo_server():
    import bson

    def reply(request_id, doc):
        body = struct.pack("<I", 0) + b"\x00" + bson.encode(doc)
        header = struct.pack("<iiii", 16 + len(body), request_id + 1000, request_id, 2013)
        return header + body

    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            for head, body in messages(self.request, 16,
                                       lambda head: struct.unpack_from("<i", head)[0] - 16):
                _, req_id, _, opcode = struct.unpack("<iiii", head)
                if opcode == 2004:  # legacy OP_QUERY handshake: answer with OP_REPLY
                    doc = {"ismaster": True, "maxWireVersion": 17, "minWireVersion": 0, "ok": 1.0}
                    payload = struct.pack("<iqii", 0, 0, 0, 1) + bson.encode(doc)
                    self.request.sendall(struct.pack("<iiii", 16 + len(payload),
                                                     req_id + 1000, req_id, 1) + payload)
                    continue
                cmd = bson.decode(body[5:5 + struct.unpack("<i", body[5:9])[0]])
                name = next(iter(cmd))
                if name in ("hello", "ismaster", "isMaster"):
                    doc = {"isWritablePrimary": True, "maxWireVersion": 17, "minWireVersion": 0,
                           "maxBsonObjectSize": 16777216, "maxMessageSizeBytes": 48000000,
                           "maxWriteBatchSize": 100000, "ok": 1.0}
                elif name == "find":
                    doc = {"cursor": {"id": 0, "ns": f"{cmd['$db']}.{cmd['find']}",
                                      "firstBatch": [{"_id": 1, "x": 1}]}, "ok": 1.0}
                elif name == "insert":
                    doc = {"n": len(cmd.get("documents", [])) or 1, "ok": 1.0}
                elif name == "failme":
                    doc = {"ok": 0.0, "errmsg": "no such command", "code": 59,
                           "codeName": "CommandNotFound"}
                else:
                    doc = {"ok": 1.0}
                self.request.sendall(reply(req_id, doc))

    socketserver.ThreadingTCPServer.allow_reuse_address = True
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    print(json.dumps({"port": server.server_address[1]}), flush=True)
    server.serve_forever()


if __name__ == "__main__":
    {"grpc": grpc_server, "dns": dns_server, "http": http_server,
     "mongo": mongo_server}[sys.argv[1]]()
