"""What the HTTP/1 and HTTP/2 parsers share: request and header attributes (OpenTelemetry
semantic conventions, with credentials redacted) and HTTP's error rule for spans.
"""

import httptools

from deeptrace_core import redaction

# Headers recorded as http.{request,response}.header.<name>; values of the sensitive
# ones are never recorded (the built-in redaction policy).
HEADER_REDACT = frozenset(redaction.HEADERS)
HEADER_ALLOW = frozenset({"content-type", "content-length", "accept", "x-request-id",
                          "x-forwarded-for", "traceparent", "tracestate", "b3", "x-b3-traceid",
                          "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled"}) | HEADER_REDACT


def header_attributes(headers: dict, prefix: str) -> dict:
    """The allow-listed headers (lower-case names) as ``<prefix>.<name>`` attributes."""
    return {f"{prefix}.{k}": (redaction.HEADER_MASK if k in HEADER_REDACT else v)
            for k, v in headers.items() if k in HEADER_ALLOW}


def split_target(target: str):
    """(path, query) of a request target: origin-form, absolute-form, authority or '*'."""
    if "://" in target:
        try:
            url = httptools.parse_url(target.encode("latin-1"))
        except (httptools.HttpParserInvalidURLError, UnicodeEncodeError):
            return target.split("?", 1)[0], ""
        return (url.path or b"/").decode("latin-1"), (url.query or b"").decode("latin-1")
    path, _, query = target.partition("?")
    return path.partition("#")[0], query


def server_attributes(authority: str) -> dict:
    """server.address / server.port from a Host header or :authority."""
    if not authority:
        return {}
    authority = redaction.strip_userinfo(authority)    # Host: user:password@host
    host, port = authority, None
    if authority.startswith("["):           # [v6]:port
        host, _, rest = authority[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
    elif authority.count(":") == 1:
        host, port = authority.split(":")
    out = {"server.address": host}
    # A port is at most 5 digits: int() of thousands of digits raises (and costs).
    if port and len(port) <= 5 and port.isascii() and port.isdigit() and int(port) <= 65535:
        out["server.port"] = int(port)
    return out


def request_attributes(method: str, target: str, headers: dict, version: str) -> tuple:
    """(operation, attributes) of an HTTP request, shared with the HTTP/2 parser."""
    path, query = split_target(target)
    path = redaction.DEFAULT.path(path)                 # /cart;jsessionid=...
    attrs = {"http.request.method": method, "url.path": path,
             "network.protocol.version": version}
    if query:
        attrs["url.query"] = redaction.DEFAULT.query(query)
    attrs.update(server_attributes(headers.get("host") or headers.get(":authority", "")))
    if "user-agent" in headers:
        attrs["user_agent.original"] = headers["user-agent"]
    attrs.update(header_attributes(headers, "http.request.header"))
    return f"{method} {path}", attrs


def number(text: str):
    """An ASCII decimal header value as an int, else None."""
    return int(text) if text.isascii() and text.isdigit() else None


class HttpErrorRule:
    """Parser mixin: OpenTelemetry counts a 4xx status as an error for the client only
    (the server answered as it should). gRPC spans have a status of their own."""

    def span_error(self, status, role, protocol):
        return role == "client" and protocol != "grpc" and status is not None \
            and status.isdigit() and 400 <= int(status) < 500
