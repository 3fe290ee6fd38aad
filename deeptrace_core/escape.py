"""One escaping rule for text that came from traced traffic and is shown to a person.

A payload may carry terminal escapes (``\\x1b]0;title\\x07``, ``\\x1b[2J``) or line
breaks that forge log lines. :func:`printable` turns every C0 control, DEL and C1
control into visible text (``\\n``, ``\\r``, ``\\t`` as such, the rest as ``\\xNN``)
and doubles a backslash, so the result is one line and the original is recoverable.
"""

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\\]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _escape(m):
    ch = m.group()
    return _NAMED.get(ch) or f"\\x{ord(ch):02x}"


def printable(s) -> str:
    """`s` (any object; str() of it) with controls escaped, safe to print on one line."""
    s = s if isinstance(s, str) else str(s)
    return _CONTROL.sub(_escape, s)
