"""`deeptrace plugin new protocol NAME` writes a distribution that installs, is found
through its entry point, and passes its own tests as generated. (Installs it into this
environment for the test, and uninstalls it afterwards.)"""

import os
import subprocess
import sys

import pytest

from deeptrace_core import scaffold, testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "scaffoldping"   # unlikely to meet a real plugin of that name


def run(*args, cwd=ROOT, timeout=600):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


def plugins_listed():
    return run("-m", "deeptrace_core.cli", "plugins").stdout


def test_generated_plugin_installs_registers_and_passes_its_tests(tmp_path):
    path = scaffold.new_protocol(NAME, tmp_path)
    assert os.path.basename(path) == f"deeptrace-plugin-{NAME}"
    out = run("-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", path)
    assert out.returncode == 0, out.stderr
    try:
        listed = plugins_listed()
        assert any(line.startswith(f"{NAME} ") and f"deeptrace-plugin-{NAME}" in line
                   and "loaded" in line for line in listed.splitlines()), listed
        tests = run("-m", "pytest", "-q", "-p", "no:cacheprovider", cwd=path)
        assert tests.returncode == 0, tests.stdout + tests.stderr
        assert " passed" in tests.stdout, tests.stdout
        if testing.bpf_unavailable_reason() is None:   # then the kernel checks ran too
            assert "skipped" not in tests.stdout, tests.stdout
    finally:
        out = run("-m", "pip", "uninstall", "-y", f"deeptrace-plugin-{NAME}")
    assert out.returncode == 0, out.stderr
    assert f"deeptrace-plugin-{NAME}" not in plugins_listed()


def test_files_and_names(tmp_path):
    path = scaffold.new_protocol("my_proto", tmp_path)
    files = sorted(os.path.relpath(os.path.join(d, f), path)
                   for d, _, fs in os.walk(path) for f in fs)
    assert files == ["README.md", "deeptrace_my_proto/__init__.py",
                     "deeptrace_my_proto/detect.bpf.c", "deeptrace_my_proto/parser.py",
                     "deeptrace_my_proto/plugin.py", "pyproject.toml",
                     "tests/test_my_proto.py"]
    with open(os.path.join(path, "deeptrace_my_proto", "plugin.py")) as f:
        plugin = f.read()
    assert "class MyProtoProtocol(ProtocolBase):" in plugin and 'name = "my_proto"' in plugin
    with open(os.path.join(path, "deeptrace_my_proto", "detect.bpf.c")) as f:
        assert "static __always_inline int detect_my_proto(const u8 *p, u32 n," in f.read()
    with open(os.path.join(path, "pyproject.toml")) as f:
        assert 'my_proto = "deeptrace_my_proto.plugin"' in f.read()
    for name in ("bad-name", "Upper", "1st", "class", ""):
        with pytest.raises(ValueError):
            scaffold.new_protocol(name, tmp_path)
    with pytest.raises(FileExistsError):
        scaffold.new_protocol("my_proto", tmp_path)


def test_main_writes_where_dest_says(tmp_path, capsys):
    assert scaffold.main(["pong", "--dest", str(tmp_path)]) == 0
    assert os.path.isfile(tmp_path / "deeptrace-plugin-pong" / "deeptrace_pong" / "plugin.py")
    assert "deeptrace-plugin-pong" in capsys.readouterr().out
    assert scaffold.main(["pong", "--dest", str(tmp_path)]) == 2


def test_cli_subcommand_parses_to_the_generator(tmp_path):
    """How deeptrace_core/cli.py wires it: scaffold.add_parser(sub), handler scaffold.run."""
    import argparse
    ap = argparse.ArgumentParser(prog="deeptrace")
    scaffold.add_parser(ap.add_subparsers(dest="command"))
    args = ap.parse_args(["plugin", "new", "protocol", "pang", "--dest", str(tmp_path)])
    assert args.command == "plugin" and scaffold.run(args) == 0
    assert os.path.isdir(tmp_path / "deeptrace-plugin-pang" / "tests")
    with pytest.raises(SystemExit):
        ap.parse_args(["plugin", "new", "exporter", "x"])
