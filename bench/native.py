"""The suite's C drivers (bench/*.c), compiled with gcc once per run into a temp dir.

gcc (or cc, gcc-12, clang: the first found) must be installed; Debian's `gcc` package.
"""

import atexit
import os
import shutil
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
_built: dict = {}
_dir = None


def compiler():
    return next((c for c in ("gcc", "cc", "gcc-12", "clang") if shutil.which(c)), None)


def build(name: str) -> str:
    """Path of the compiled bench/<name>.c (dtb_<name>)."""
    global _dir
    if name in _built:
        return _built[name]
    if _dir is None:
        _dir = tempfile.mkdtemp(prefix="dtb-bin-")
        atexit.register(shutil.rmtree, _dir, True)
    out = os.path.join(_dir, f"dtb_{name}")
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler (gcc, cc, gcc-12, clang) found: apt-get install gcc")
    subprocess.run([cc, "-O2", "-Wall", "-o", out, os.path.join(HERE, f"{name}.c")],
                   check=True)
    _built[name] = out
    return out
