"""The suite's C drivers (bench/*.c), compiled with gcc once per run into a temp dir."""

import atexit
import os
import shutil
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
_built: dict = {}
_dir = None


def build(name: str) -> str:
    """Path of the compiled bench/<name>.c (dtb_<name>)."""
    global _dir
    if name in _built:
        return _built[name]
    if _dir is None:
        _dir = tempfile.mkdtemp(prefix="dtb-bin-")
        atexit.register(shutil.rmtree, _dir, True)
    out = os.path.join(_dir, f"dtb_{name}")
    subprocess.run(["gcc", "-O2", "-Wall", "-o", out, os.path.join(HERE, f"{name}.c")],
                   check=True)
    _built[name] = out
    return out
