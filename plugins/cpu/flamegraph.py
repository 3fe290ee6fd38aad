"""Folded stacks and a self-contained flame graph SVG (no external tools).

Folded format (Brendan Gregg's): one line per distinct stack, frames root first joined by
``;``, a space, the sample count. Kernel frames carry the suffix ``_[k]``.
"""

from __future__ import annotations

import hashlib
from xml.sax.saxutils import escape

WIDTH = 1200
FRAME_H = 16
PAD_TOP = 40
PAD_SIDE = 10
FONT = 12
CHAR_W = 7.0          # average glyph width of a 12px monospace-ish font
MIN_W = 0.1           # frames narrower than this (px) are not drawn


def folded_text(stacks: dict) -> str:
    """{(frame, ...): count} -> folded lines, heaviest first."""
    lines = sorted(stacks.items(), key=lambda kv: (-kv[1], kv[0]))
    return "".join(f"{';'.join(frames)} {count}\n" for frames, count in lines if count > 0)


def parse_folded(text: str) -> dict:
    out: dict = {}
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            key = tuple(stack.split(";"))
            out[key] = out.get(key, 0) + int(count)
    return out


class _Node:
    __slots__ = ("name", "value", "children")

    def __init__(self, name):
        self.name = name
        self.value = 0
        self.children: dict = {}


def _tree(stacks: dict) -> _Node:
    root = _Node("all")
    for frames, count in stacks.items():
        root.value += count
        node = root
        for f in frames:
            node = node.children.setdefault(f, _Node(f))
            node.value += count
    return root


def _color(name: str) -> str:
    h = int.from_bytes(hashlib.md5(name.encode()).digest()[:4], "little")
    v1, v2, v3 = (h & 0xFF) / 255, ((h >> 8) & 0xFF) / 255, ((h >> 16) & 0xFF) / 255
    if name.endswith("_[k]"):                         # kernel: orange
        return f"rgb({205 + int(50 * v3)},{130 + int(60 * v1)},{int(40 * v2)})"
    if name.startswith("[") and name.endswith("]"):   # unknown / module only: grey
        return f"rgb({160 + int(40 * v1)},{160 + int(40 * v1)},{170 + int(40 * v1)})"
    return f"rgb({205 + int(50 * v3)},{int(230 * v1)},{int(55 * v2)})"   # user: warm


def svg(stacks: dict, title: str = "CPU flame graph") -> str:
    """The flame graph of folded stacks as one SVG document (root at the bottom)."""
    root = _tree(stacks)
    depth = 0

    def measure(node, d):
        nonlocal depth
        depth = max(depth, d)
        for c in node.children.values():
            measure(c, d + 1)

    measure(root, 0)
    height = PAD_TOP + (depth + 1) * FRAME_H + 30
    total = root.value or 1
    scale = (WIDTH - 2 * PAD_SIDE) / total
    out = [
        '<?xml version="1.0" standalone="no"?>\n',
        f'<svg version="1.1" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" '
        'xmlns="http://www.w3.org/2000/svg">\n',
        '<style>text{font-family:Verdana,sans-serif;font-size:%dpx;fill:#000}'
        'g:hover rect{stroke:#000;stroke-width:0.5}</style>\n' % FONT,
        f'<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="#f8f8f8"/>\n',
        f'<text x="{WIDTH / 2}" y="24" text-anchor="middle" style="font-size:17px">'
        f'{escape(title)}</text>\n',
        f'<text x="{PAD_SIDE}" y="{height - 10}">{root.value} samples</text>\n',
    ]

    def draw(node, x, d):
        w = node.value * scale
        if w < MIN_W:
            return
        y = height - 30 - (d + 1) * FRAME_H
        pct = 100.0 * node.value / total
        label = node.name
        out.append(f'<g><title>{escape(label)} ({node.value} samples, {pct:.2f}%)</title>'
                   f'<rect x="{x:.2f}" y="{y}" width="{w:.2f}" height="{FRAME_H - 1}" '
                   f'fill="{_color(label)}" rx="2" ry="2"/>')
        fit = int((w - 6) / CHAR_W)
        if fit >= 3:
            text = label if len(label) <= fit else label[:fit - 2] + ".."
            out.append(f'<text x="{x + 3:.2f}" y="{y + FRAME_H - 4}">{escape(text)}</text>')
        out.append("</g>\n")
        cx = x
        for child in sorted(node.children.values(), key=lambda c: c.name):
            draw(child, cx, d + 1)
            cx += child.value * scale

    draw(root, PAD_SIDE, 0)
    out.append("</svg>\n")
    return "".join(out)
