"""``deeptrace plugin new protocol NAME``: writes a new protocol plugin distribution,
``deeptrace-plugin-NAME``, that installs, registers and passes its own tests as written.

The files come from ``deeptrace_core/templates/protocol`` (``string.Template``:
``$name``, ``$Name``); the protocol they implement is a line protocol to start from
(``PING <id>\\n`` answered by ``PONG <id>\\n``).
"""

import argparse
import importlib.resources
import keyword
import os
import re
import string
import sys

# template file -> path in the distribution ("package" is the import package)
FILES = {
    "pyproject.toml.tmpl": "pyproject.toml",
    "README.md.tmpl": "README.md",
    "package/__init__.py.tmpl": "deeptrace_{name}/__init__.py",
    "package/detect.bpf.c.tmpl": "deeptrace_{name}/detect.bpf.c",
    "package/parser.py.tmpl": "deeptrace_{name}/parser.py",
    "package/plugin.py.tmpl": "deeptrace_{name}/plugin.py",
    "tests/test_protocol.py.tmpl": "tests/test_{name}.py",
}


def check_name(name: str) -> str:
    """The name is a config key, a C identifier part and a Python package part."""
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,30}", name) or keyword.iskeyword(name):
        raise ValueError(f"protocol name {name!r}: use lower-case letters, digits and _, "
                         "starting with a letter")
    return name


def new_protocol(name: str, dest_dir) -> str:
    """Write deeptrace-plugin-<name> under dest_dir; returns its path. An existing
    directory is never overwritten."""
    check_name(name)
    path = os.path.join(os.fspath(dest_dir), f"deeptrace-plugin-{name}")
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists")
    words = {"name": name, "Name": "".join(w.capitalize() for w in name.split("_"))}
    root = importlib.resources.files("deeptrace_core").joinpath("templates", "protocol")
    for src, dst in FILES.items():
        text = string.Template(root.joinpath(*src.split("/")).read_text()).substitute(words)
        target = os.path.join(path, dst.format(name=name))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "w") as f:
            f.write(text)
    return path


def _arguments(ap):
    ap.add_argument("name", help="the protocol's name (lower case, e.g. ping)")
    ap.add_argument("--dest", default=".", help="the folder to write it in (default: .)")


def add_parser(sub):
    """`plugin new protocol NAME [--dest DIR]` among the CLI's subcommands."""
    plugin = sub.add_parser("plugin", help="plugin tools")
    new = plugin.add_subparsers(dest="plugin_command", required=True).add_parser(
        "new", help="write a new plugin distribution")
    kinds = new.add_subparsers(dest="plugin_kind", required=True)
    _arguments(kinds.add_parser("protocol", help="an L7 protocol plugin"))


def run(args) -> int:
    try:
        path = new_protocol(args.name, args.dest)
    except (ValueError, FileExistsError) as exc:
        print(f"deeptrace: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}\n  pip install -e {path}    # then: deeptrace plugins\n"
          f"  cd {path} && python -m pytest")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="deeptrace plugin new protocol",
                                 description="Write a new L7 protocol plugin distribution.")
    _arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
