"""Redaction: what the agent replaces before any exporter sees a record.

The agent reads every process's traffic and command line, so credentials are replaced by
default, in two places:
- the protocol parsers apply the built-in rules as they build attributes (a statement's
  password, a Redis AUTH argument, an ``Authorization`` header), so no span ever holds
  them;
- every pipeline applies the whole policy (built-in plus the ``redaction:`` section of the
  config) to each batch after its processors and before its exporters (`Redactor.batch`).

Every list in the config *extends* the built-in one. Names are compared case-insensitively;
a name ending in ``*`` is a prefix. A pattern is a regular expression: its group named
``secret`` (else the whole match) becomes ``?``.
"""

import re
import urllib.parse
from collections import OrderedDict

import attrs
from attrs import validators as v

MASK = "REDACTED"          # in URL query and path parameters, as OpenTelemetry's url.query guidance
HEADER_MASK = "[REDACTED]"

# Header values never recorded.
HEADERS = ("authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key",
           "x-auth-token", "x-amz-security-token", "x-csrf-token")
# URL query parameters whose values are credentials: OpenTelemetry's list, OAuth 2.0 and
# OpenID Connect (code, tokens, client secret), AWS SigV4 presigned URLs, API keys.
QUERY_PARAMS = ("awsaccesskeyid", "signature", "sig", "x-goog-signature", "x-goog-credential",
                "x-amz-signature", "x-amz-credential", "x-amz-security-token",
                "access_token", "refresh_token", "id_token", "token", "code", "client_secret",
                "api_key", "apikey", "key", "password", "passwd", "pwd", "secret",
                "session", "sessionid", "session_id", "jsessionid", "phpsessid", "auth")
# Session ids carried as path parameters: /cart;jsessionid=...
PATH_PARAMS = ("jsessionid", "phpsessid", "sid", "sessionid", "session_id")
# Options whose value is a credential, in any program's command line ("--password x",
# "--password=x"); "prog:-x" applies to that program only (redis-cli -a is a password,
# ls -a is not). A one-letter option also matches its value attached ("mysql -pSECRET").
COMMAND_LINE_OPTIONS = ("--password", "--pass", "--passwd", "--pwd", "--token", "--secret",
                        "--api-key", "--apikey", "--access-token", "--client-secret",
                        "--auth", "--requirepass", "--masterauth", "--private-key",
                        "redis-cli:-a", "redis-benchmark:-a", "mysql:-p", "mysqldump:-p",
                        "mysqladmin:-p", "mariadb:-p", "mariadb-dump:-p", "mongosh:-p",
                        "mongo:-p", "sshpass:-p", "curl:-u", "curl:--user")
COMMAND_LINE_MODES = ("redact", "drop", "keep")
PAYLOAD_MODES = ("drop", "keep")
# Record attributes whose text is a statement: the protocol families the patterns target.
PATTERN_FAMILIES = {"sql": ("mysql", "postgresql"), "redis": ("redis",)}

_SECRET_WORD = r"(?:password|passwd|pwd|secret|token|credential|(?:api|access|private)[_.-]?key)"
# An argument name=value whose name says it is a secret: PGPASSWORD=x, db.password=x.
_ARG_ASSIGN = re.compile(r"(?i)(?<![^\s])([\w.-]*" + _SECRET_WORD + r"[\w.-]*=)(\S+)")
# user:password@ in a URL: postgresql://app:pw@db/x, redis://:pw@cache.
_URL_USERINFO = re.compile(r"(\b[A-Za-z][\w+.-]*://[^/\s:@]*:)[^@\s/]*@")


def _regex(_inst, attribute, value):
    for p in value:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"{attribute.name}: {p!r} is not a regular expression: {e}") from None


def _names(_inst, attribute, value):
    for n in value:
        if not n or n == "*":
            raise ValueError(f"{attribute.name}: {n!r} names nothing (give a name, or a "
                             "prefix ending in *)")


@attrs.define
class Patterns:
    """``redaction.patterns``: regular expressions on statement text, by protocol family."""

    sql: list[str] = attrs.field(factory=list, validator=_regex)     # mysql, postgresql
    redis: list[str] = attrs.field(factory=list, validator=_regex)


@attrs.define
class RedactionConfig:
    """``redaction:`` in the YAML config. Lists extend the built-in ones (see README)."""

    headers: list[str] = attrs.field(factory=list, validator=_names)
    query_params: list[str] = attrs.field(factory=list, validator=_names)
    path_params: list[str] = attrs.field(factory=list, validator=_names)
    patterns: Patterns = attrs.Factory(Patterns)
    # redact: values of credential options, URL userinfo and secret=value arguments become
    # "?"; drop: only the executable is kept; keep: as read from /proc (not advised).
    command_line: str = attrs.field(default="redact", validator=v.in_(COMMAND_LINE_MODES))
    command_line_options: list[str] = attrs.field(factory=list, validator=_names)
    # Raw socket records (a pipeline without the spans processor) carry payload bytes that
    # no rule can clean: dropped (emptied, sizes kept) unless `keep`.
    payloads: str = attrs.field(default="drop", validator=v.in_(PAYLOAD_MODES))


class _NameSet:
    """Case-insensitive names plus prefixes (a trailing '*')."""

    def __init__(self, names):
        names = [n.lower() for n in names]
        self.exact = frozenset(n for n in names if not n.endswith("*"))
        self.prefixes = tuple(n[:-1] for n in names if n.endswith("*"))

    def __contains__(self, name: str) -> bool:
        name = name.lower()
        return name in self.exact or (bool(self.prefixes) and name.startswith(self.prefixes))


def _sub_secret(rx):
    """A replacement function: the 'secret' group (else the whole match) becomes '?'."""
    if "secret" in rx.groupindex:
        def repl(m):
            s, e = m.span("secret")
            if s < 0:
                return m.group(0)
            a = m.start()
            return m.group(0)[:s - a] + "?" + m.group(0)[e - a:]
        return repl
    return "?"


class Redactor:
    """The policy, compiled. `batch` is the pipeline's call; the others serve parsers."""

    def __init__(self, config: RedactionConfig | None = None):
        config = config or RedactionConfig()
        self.config = config
        self.query_names = _NameSet(QUERY_PARAMS + tuple(config.query_params))
        path_names = [re.escape(n.lower()).replace(r"\*", r"[^=;/?#]*")
                      for n in PATH_PARAMS + tuple(config.path_params)]
        self._path_rx = re.compile(r"(?i)(;(?:%s)=)[^/;?#]*" % "|".join(path_names))
        headers = [h.lower() for h in HEADERS + tuple(config.headers)]
        self.header_names = _NameSet(headers)
        self._header_keys = frozenset(f"http.{d}.header.{h}" for d in ("request", "response")
                                      for h in headers if not h.endswith("*"))
        self._header_prefixes = tuple(f"http.{d}.header.{h[:-1]}" for d in ("request", "response")
                                      for h in headers if h.endswith("*"))
        self._patterns = {}
        for family, protocols in PATTERN_FAMILIES.items():
            rxs = [re.compile(p, re.S) for p in getattr(config.patterns, family)]
            for proto in protocols:
                self._patterns[proto] = [(rx, _sub_secret(rx)) for rx in rxs]
        self._cmd_rx = _command_line_rx(COMMAND_LINE_OPTIONS + tuple(config.command_line_options))
        self._cmdlines = OrderedDict()   # raw -> redacted: a process's spans share one
        self.drop_payloads = config.payloads == "drop"

    # -- pieces -------------------------------------------------------------------------
    def query(self, query: str) -> str:
        """A URL query with the values of secret parameters replaced by REDACTED. Names are
        percent-decoded before they are compared (api%5Fkey is api_key)."""
        if not query:
            return query
        parts = query.split("&")
        changed = False
        for i, part in enumerate(parts):
            name, eq, value = part.partition("=")
            if not eq or not value:
                continue
            plain = urllib.parse.unquote_plus(name) if ("%" in name or "+" in name) else name
            if plain.strip() in self.query_names:
                parts[i] = f"{name}={MASK}"
                changed = True
        return "&".join(parts) if changed else query

    def path(self, path: str) -> str:
        """A URL path with session path parameters (;jsessionid=...) replaced."""
        return self._path_rx.sub(r"\1" + MASK, path) if ";" in path else path

    def command_line(self, cmdline: str) -> str:
        mode = self.config.command_line
        if mode == "keep" or not cmdline:
            return cmdline
        if mode == "drop":
            return cmdline.split(" ", 1)[0]
        out = self._cmdlines.get(cmdline)
        if out is None:
            out = redact_command_line(cmdline, self._cmd_rx)
            if len(self._cmdlines) >= 4096:
                self._cmdlines.popitem(last=False)
            self._cmdlines[cmdline] = out
        return out

    def statement(self, protocol: str, text: str) -> str:
        for rx, repl in self._patterns.get(protocol, ()):
            text = rx.sub(repl, text)
        return text

    # -- records ------------------------------------------------------------------------
    def attributes(self, attrs_: dict, protocol: str | None = None):
        """Redact an attribute dict in place."""
        for key in self._header_keys.intersection(attrs_):
            attrs_[key] = HEADER_MASK
        if self._header_prefixes:
            for key in [k for k in attrs_ if k.startswith(self._header_prefixes)]:
                attrs_[key] = HEADER_MASK
        q = attrs_.get("url.query")
        if q:
            attrs_["url.query"] = self.query(q)
        for key in ("url.path", "http.route"):
            p = attrs_.get(key)
            if p and ";" in p:
                attrs_[key] = self.path(p)
        full = attrs_.get("url.full")
        if full:
            attrs_["url.full"] = redact_url(full, self)
        host = attrs_.get("server.address")
        if host and "@" in host:
            attrs_["server.address"] = host.rpartition("@")[2]
        if protocol in self._patterns and self._patterns[protocol]:
            text = attrs_.get("db.query.text")
            if text:
                attrs_["db.query.text"] = self.statement(protocol, text)
        cmd = attrs_.get("process.command_line")
        if cmd:
            attrs_["process.command_line"] = self.command_line(cmd)

    def batch(self, batch: list) -> list:
        """The batch as exporters may see it. Spans are this pipeline's own and are changed
        in place; a raw record may be shared with other pipelines, so it is copied."""
        out = None
        for i, rec in enumerate(batch):
            kind = getattr(rec, "kind", None)
            if kind == "span":
                self.attributes(rec.attributes, rec.protocol)
                if rec.operation and ";" in rec.operation:
                    rec.operation = self.path(rec.operation)
                if rec.cmdline:
                    rec.cmdline = self.command_line(rec.cmdline)
                continue
            new = rec
            if self.drop_payloads and getattr(rec, "payload", None):
                new = attrs.evolve(rec, payload=b"") if attrs.has(type(rec)) else rec
            attributes = getattr(rec, "attributes", None)
            if isinstance(attributes, dict) and "process.command_line" in attributes:
                if new is rec and attrs.has(type(rec)):
                    new = attrs.evolve(rec, attributes=dict(attributes))
                self.attributes(new.attributes)
            if new is not rec:
                if out is None:
                    out = list(batch)
                out[i] = new
        return batch if out is None else out


def _command_line_rx(options):
    """One regex per program scope: {None: any program, 'redis-cli': ..., ...}."""
    scoped = {}
    for opt in options:
        prog, colon, name = opt.rpartition(":")
        scoped.setdefault(prog if colon else None, []).append(name if colon else opt)
    out = {}
    for prog, names in scoped.items():
        alts = []
        for n in names:
            e = re.escape(n)
            # "-a VALUE", "--opt=VALUE", "--opt VALUE"; one-letter options also "-aVALUE".
            alts.append(e + (r"(?:=|\s+|(?=[^\s=]))" if re.fullmatch(r"-\w", n) else r"(?:=|\s+)"))
        out[prog] = re.compile(r"(?<!\S)((?:%s))(\S+)" % "|".join(alts), re.I if prog is None else 0)
    return out


def redact_command_line(cmdline: str, rxs) -> str:
    """Values of credential options, userinfo in URLs and secret=value arguments become ?."""
    exe = cmdline.split(" ", 1)[0].rsplit("/", 1)[-1]
    for prog in (None, exe):
        rx = rxs.get(prog)
        if rx is not None:
            cmdline = rx.sub(r"\1?", cmdline)
    cmdline = _URL_USERINFO.sub(r"\1?@", cmdline)
    return _ARG_ASSIGN.sub(r"\1?", cmdline)


def redact_url(url: str, redactor: "Redactor") -> str:
    """A full URL: userinfo password, path parameters and query secrets."""
    rest, hash_, frag = url.partition("#")
    base, q, query = rest.partition("?")
    base = _URL_USERINFO.sub(r"\1" + MASK + "@", base)
    return redactor.path(base) + q + redactor.query(query) + hash_ + frag


def strip_userinfo(authority: str) -> str:
    """host[:port] of an authority that may carry user:password@ (a Host header may)."""
    return authority.rpartition("@")[2] if "@" in authority else authority


# The built-in policy, which the parsers apply as they build attributes.
DEFAULT = Redactor()
