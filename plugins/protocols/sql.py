"""What the MySQL and PostgreSQL parsers share: the operation keyword of a statement,
password redaction, the size cap of recorded statement text, and the capped memory of
prepared statements.

The text may be a prefix (the capture cut it), so every pattern accepts an unterminated
quoted literal at the end: a password cut in half is still redacted.
"""

import re
from collections import OrderedDict

QUERY_MAX = 2048   # characters of statement text kept in db.query.text

# Whitespace, comments and opening parentheses before the first keyword. A MySQL
# "/*!40101 ... */" comment is executable code, so only its marker is skipped.
_LEAD = re.compile(r"(?:\s+|\(|/\*![0-9]*|/\*(?!!).*?(?:\*/|\Z)"
                   r"|--[^\n]*(?:\n|\Z)|#[^\n]*(?:\n|\Z))*", re.S)
_WORD = re.compile(r"[A-Za-z_]+")

_QUOTED = r"""'(?:[^'\\]|\\.|'')*(?:'|\Z)|"(?:[^"\\]|\\.|"")*(?:"|\Z)"""
_REDACT = [
    # MySQL: SET PASSWORD [FOR user] = 'x' | = PASSWORD('x'): the user comes before '='.
    (re.compile(r"(\bSET\s+PASSWORD\b[^=]*=\s*(?:PASSWORD\s*\(\s*)?)(" + _QUOTED + ")",
                re.I | re.S), r"\1'?'"),
    # PASSWORD 'x' (PostgreSQL roles, MySQL PASSWORD('x'), user mappings), IDENTIFIED BY
    # 'x', IDENTIFIED BY PASSWORD 'x', IDENTIFIED WITH|VIA plugin BY|AS|USING 'x'.
    (re.compile(r"(\b(?:PASSWORD|IDENTIFIED\s+BY|IDENTIFIED\s+(?:WITH|VIA)\s+\w+\s+(?:BY|AS|USING))"
                r"\s*(?:=\s*)?(?:PASSWORD\s*)?\(?\s*)(" + _QUOTED + ")", re.I | re.S), r"\1'?'"),
    # password=... inside connection strings (dblink, CREATE SUBSCRIPTION ... CONNECTION).
    (re.compile(r"(\bpassword\s*=\s*)([^\s'\"]+)", re.I), r"\1?"),
]


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
