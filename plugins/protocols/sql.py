"""What the MySQL and PostgreSQL plugins share: their config, the byte classes their
detectors check, the operation keyword of a statement, password redaction, the size cap
of recorded statement text, the capped memory of prepared statements and the parser base
that holds it.

The text may be a prefix (the capture cut it), so every pattern accepts an unterminated
quoted literal at the end: a password cut in half is still redacted.
"""

import re
from collections import OrderedDict

import attrs
from attrs import validators as v

from deeptrace_core.l7 import FramedParser

QUERY_MAX = 2048   # characters of statement text kept in db.query.text

# Whitespace, comments and opening parentheses before the first keyword. A MySQL
# "/*!40101 ... */" comment is executable code, so only its marker is skipped.
_LEAD = re.compile(r"(?:\s+|\(|/\*![0-9]*|/\*(?!!).*?(?:\*/|\Z)"
                   r"|--[^\n]*(?:\n|\Z)|#[^\n]*(?:\n|\Z))*", re.S)
_WORD = re.compile(r"[A-Za-z_]+")

# A literal: 'x' (with '' and backslash escapes), E'x' (PostgreSQL escapes), N'x', "x",
# and PostgreSQL dollar quoting $$x$$ / $tag$x$tag$.
_QUOTED = (r"""(?:[EeNn]?'(?:[^'\\]|\\.|'')*(?:'|\Z)|"(?:[^"\\]|\\.|"")*(?:"|\Z)"""
           r"""|\$(?P<tag>[A-Za-z_]\w*)?\$.*?(?:\$(?P=tag)\$|\Z))""")
# Blanks and comments a statement may hold between a keyword and its literal.
_GAP = r"(?:\s|/\*.*?(?:\*/|\Z)|--[^\n]*(?:\n|\Z))*"
_REDACT = [
    # MySQL: SET PASSWORD [FOR user] = 'x' | = PASSWORD('x'): the user comes before '='.
    (re.compile(r"(\bSET\s+PASSWORD\b[^=]*=" + _GAP + r"(?:PASSWORD" + _GAP + r"\(" + _GAP + r")?)("
                + _QUOTED + ")", re.I | re.S), r"\1'?'"),
    # PASSWORD 'x' (PostgreSQL roles, MySQL PASSWORD('x'), user mappings), IDENTIFIED BY
    # 'x', IDENTIFIED BY PASSWORD 'x', IDENTIFIED WITH|VIA plugin BY|AS|USING 'x', and
    # MySQL replication's MASTER_PASSWORD / SOURCE_PASSWORD = 'x'.
    (re.compile(r"(\b(?:(?:MASTER_|SOURCE_)?PASSWORD|IDENTIFIED\s+BY"
                r"|IDENTIFIED\s+(?:WITH|VIA)\s+\w+\s+(?:BY|AS|USING))"
                + _GAP + r"(?:=" + _GAP + r")?(?:PASSWORD" + _GAP + r")?\(?" + _GAP + r")("
                + _QUOTED + ")", re.I | re.S), r"\1'?'"),
    # password=... inside connection strings (dblink, CREATE SUBSCRIPTION ... CONNECTION).
    (re.compile(r"(\bpassword\s*=\s*)([^\s'\"]+)", re.I), r"\1?"),
]


@attrs.define
class StatementsConfig:
    """``processors.spans.protocol_config.mysql`` (and ``.postgresql``) in the YAML config."""

    # Prepared statements remembered per connection (LRU); PostgreSQL's named ones.
    max_statements: int = attrs.field(default=4096, validator=[v.ge(1), v.le(1_000_000)])


def text_byte(c: int) -> bool:
    """Printable ASCII or whitespace: a byte of statement text (the detectors' check)."""
    return 0x20 <= c < 0x7f or 9 <= c <= 13


def statement_start(c: int) -> bool:
    """A byte a statement's text may start with: a letter, '(', a comment or whitespace."""
    return 0x41 <= c <= 0x5a or 0x61 <= c <= 0x7a or c in b"(/- \t\n\r"


def first_keyword(text: str) -> str:
    """The statement's first keyword upper-cased ("SELECT"), "" when there is none."""
    m = _LEAD.match(text)
    w = _WORD.match(text, m.end() if m else 0)
    return w.group(0).upper() if w else ""


def redact(text: str) -> str:
    """The statement with password literals replaced by '?', cut to QUERY_MAX."""
    text = text[:QUERY_MAX]
    upper = text.upper()
    if "PASSWORD" in upper or "IDENTIFIED" in upper:
        for rx, repl in _REDACT:
            text = rx.sub(repl, text)
    return text


def decode(b: bytes) -> str:
    return b.decode("utf-8", "replace")


class Statements(OrderedDict):
    """Prepared statement texts by id or name, least recently prepared dropped first once
    there are more than `cap` (a connection may prepare without end)."""

    def __init__(self, cap: int):
        super().__init__()
        self.cap = cap

    def remember(self, key, text: str):
        self[key] = text
        self.move_to_end(key)
        while len(self) > self.cap:
            self.popitem(last=False)


class StatementsParser(FramedParser):
    """Base of the MySQL and PostgreSQL parsers: the connection's prepared statements by
    id (MySQL) or name (PostgreSQL), at most `max_statements` of them."""

    def __init__(self, max_statements: int = 4096):
        super().__init__()
        self.max_statements = max_statements
        self.statements = Statements(max_statements)
