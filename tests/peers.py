"""Real peer processes for the trace probe tests: each side drives one named syscall.

    peers.py server FAMILY L4 SEND RECV [accept|accept4]   prints {"port": N}, then its report
    peers.py client FAMILY L4 SEND RECV PORT               prints its report

Each waits for a line on stdin before its first syscall, so the test can select its pid
in the probe first.

TCP: client sends A, server replies B, client sends C (ping-pong, so reads never merge).
UDP: client sends A and C; the server receives both (datagrams need no reply).
The report (one JSON line) holds pid, fd, local/peer address, and the bytes moved, which
the tests compare with what the probe recorded.
"""

import ctypes
import json
import os
import socket
import sys

MSG_A = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
MSG_B = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
MSG_C = b"second-request-from-client!"

libc = ctypes.CDLL(None, use_errno=True)


class iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                ("iov", ctypes.POINTER(iovec)), ("iovlen", ctypes.c_size_t),
                ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


class mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", msghdr), ("len", ctypes.c_uint32)]


def _iov(bufs):
    arr = (iovec * len(bufs))()
    for i, b in enumerate(bufs):
        arr[i].base = ctypes.addressof(b)
        arr[i].len = len(b)
    return arr


def _sockaddr(fam, addr):
    """A raw sockaddr for (host, port), kept alive by the caller."""
    host, port = addr[0], addr[1]
    if fam == socket.AF_INET:
        raw = (socket.AF_INET.to_bytes(2, "little") + port.to_bytes(2, "big")
               + socket.inet_pton(fam, host) + bytes(8))
    else:
        raw = (socket.AF_INET6.to_bytes(2, "little") + port.to_bytes(2, "big") + bytes(4)
               + socket.inet_pton(fam, host) + bytes(4))
    return ctypes.create_string_buffer(raw, len(raw))


def sendmmsg(sock, messages, addr=None):
    """messages: list of lists of byte chunks (one iovec each)."""
    keep, hdrs = [], (mmsghdr * len(messages))()
    for i, chunks in enumerate(messages):
        bufs = [ctypes.create_string_buffer(c, len(c)) for c in chunks]
        iov = _iov(bufs)
        keep += [bufs, iov]
        hdrs[i].hdr.iov = ctypes.cast(iov, ctypes.POINTER(iovec))
        hdrs[i].hdr.iovlen = len(bufs)
        if addr is not None:
            sa = _sockaddr(sock.family, addr)
            keep.append(sa)
            hdrs[i].hdr.name = ctypes.addressof(sa)
            hdrs[i].hdr.namelen = len(sa)
    n = libc.sendmmsg(sock.fileno(), hdrs, len(messages), 0)
    if n < 0:
        raise OSError(ctypes.get_errno(), "sendmmsg")
    return [hdrs[i].len for i in range(n)]


def recvmmsg(sock, vlen, sizes):
    """Receive up to vlen messages, each into iovecs of the given sizes."""
    keep, hdrs = [], (mmsghdr * vlen)()
    names = []
    for i in range(vlen):
        bufs = [ctypes.create_string_buffer(s) for s in sizes]
        iov = _iov(bufs)
        name = ctypes.create_string_buffer(128)
        keep += [bufs, iov]
        names.append(name)
        hdrs[i].hdr.iov = ctypes.cast(iov, ctypes.POINTER(iovec))
        hdrs[i].hdr.iovlen = len(bufs)
        hdrs[i].hdr.name = ctypes.addressof(name)
        hdrs[i].hdr.namelen = 128
    n = libc.recvmmsg(sock.fileno(), hdrs, vlen, 0, None)
    if n < 0:
        raise OSError(ctypes.get_errno(), "recvmmsg")
    out = []
    for i in range(n):
        data, left = b"", hdrs[i].len
        for b in keep[2 * i]:
            data += b.raw[:min(left, len(b))]
            left -= min(left, len(b))
        out.append(data)
    return out


def send(sock, how, data, addr=None):
    """Send `data` with the named syscall; vectored calls split it across iovecs."""
    fd = sock.fileno()
    parts = [data[:5], data[5:11], data[11:]]
    if how == "write":
        return os.write(fd, data)
    if how == "writev":
        return os.writev(fd, parts)
    if how == "sendto":
        return sock.sendto(data, addr) if addr else sock.send(data)
    if how == "sendmsg":
        return sock.sendmsg(parts, [], 0, addr) if addr else sock.sendmsg(parts)
    if how == "sendmmsg":
        return sum(sendmmsg(sock, [parts], addr))
    raise ValueError(how)


def recv(sock, how, size):
    """Receive up to `size` bytes with the named syscall; vectored calls scatter."""
    fd = sock.fileno()
    if how == "read":
        return os.read(fd, size)
    if how == "readv":
        bufs = [bytearray(7), bytearray(size)]
        n = os.readv(fd, bufs)
        return (bytes(bufs[0]) + bytes(bufs[1]))[:n]
    if how == "recvfrom":
        return sock.recvfrom(size)[0]
    if how == "recvmsg":
        bufs = [bytearray(7), bytearray(size)]
        n = sock.recvmsg_into(bufs)[0]
        return (bytes(bufs[0]) + bytes(bufs[1]))[:n]
    if how == "recvmmsg":
        return recvmmsg(sock, 1, [7, size])[0]
    raise ValueError(how)


def recv_exact(sock, how, n):
    data = b""
    while len(data) < n:
        chunk = recv(sock, how, n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _addr(a):
    return [a[0], a[1]]


def report(sock, **extra):
    out = {"pid": os.getpid(), "tid": libc.syscall(186), "fd": sock.fileno(),
           "local": _addr(sock.getsockname())}
    try:
        out["peer"] = _addr(sock.getpeername())
    except OSError:
        out["peer"] = None
    out.update(extra)
    print(json.dumps(out), flush=True)


def accept(srv, how):
    """accept4 is what Python uses; plain accept(2) goes through libc."""
    if how == "accept4":
        return srv.accept()[0]
    fd = libc.accept(srv.fileno(), None, None)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "accept")
    return socket.socket(fileno=fd)


def main(argv):
    role, fam, l4, how_send, how_recv = argv[:5]
    sys.stdin.readline()
    family = socket.AF_INET if fam == "ipv4" else socket.AF_INET6
    host = "127.0.0.1" if fam == "ipv4" else "::1"
    kind = socket.SOCK_STREAM if l4 == "tcp" else socket.SOCK_DGRAM
    if role == "server":
        srv = socket.socket(family, kind)
        srv.bind((host, 0))
        if l4 == "tcp":
            srv.listen(1)
            print(json.dumps({"port": srv.getsockname()[1]}), flush=True)
            conn = accept(srv, argv[5] if len(argv) > 5 else "accept4")
            a = recv_exact(conn, how_recv, len(MSG_A))
            send(conn, how_send, MSG_B)
            c = recv_exact(conn, how_recv, len(MSG_C))
            report(conn, received=[a.hex(), c.hex()], sent=[MSG_B.hex()])
            conn.close()
        else:
            print(json.dumps({"port": srv.getsockname()[1]}), flush=True)
            a = recv(srv, how_recv, 4096)
            c = recv(srv, how_recv, 4096)
            report(srv, received=[a.hex(), c.hex()], sent=[])
        srv.close()
        return
    port = int(argv[5])
    sock = socket.socket(family, kind)
    if l4 == "tcp":
        sock.connect((host, port))
        send(sock, how_send, MSG_A)
        b = recv_exact(sock, how_recv, len(MSG_B))
        send(sock, how_send, MSG_C)
        report(sock, received=[b.hex()], sent=[MSG_A.hex(), MSG_C.hex()])
    else:
        addr = None
        if how_send in ("write", "writev"):
            sock.connect((host, port))  # write/writev need a connected datagram socket
        else:
            sock.bind((host, 0))
            addr = (host, port)
        send(sock, how_send, MSG_A, addr)
        send(sock, how_send, MSG_C, addr)
        report(sock, received=[], sent=[MSG_A.hex(), MSG_C.hex()])
    sock.close()


if __name__ == "__main__":
    main(sys.argv[1:])
