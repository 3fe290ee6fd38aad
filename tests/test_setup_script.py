"""scripts/setup.sh and the machine's /usr/sbin/policy-rc.d (issue 13): an existing one is
kept intact, ours is always removed, even when apt-get fails. apt-get and dpkg-query are
stand-ins on PATH; the policy file's path is redirected with DEEPTRACE_POLICY_RC_D."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "setup.sh"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="setup.sh runs as root only")


def run_setup(tmp_path, policy):
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    seen = tmp_path / "seen-during-install"
    (bin_ / "dpkg-query").write_text("#!/bin/sh\nexit 1\n")          # nothing installed
    (bin_ / "apt-get").write_text(
        "#!/bin/sh\n"
        '[ "$1" = update ] && exit 0\n'
        f'cat "{policy}" > "{seen}" 2>/dev/null; ls -l "{policy}" >> "{seen}"\n'
        "exit 100\n")                                                  # the install fails
    for f in bin_.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}",
           "DEEPTRACE_POLICY_RC_D": str(policy)}
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=60)
    return proc, seen.read_text() if seen.exists() else ""


def test_bash_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_ours_is_removed_when_apt_fails(tmp_path):
    policy = tmp_path / "policy-rc.d"
    proc, seen = run_setup(tmp_path, policy)
    assert proc.returncode == 100, proc.stderr
    assert seen.startswith("#!/bin/sh\nexit 101\n")      # ours was in place during install
    assert not policy.exists() and not list(tmp_path.glob("policy-rc.d*"))


def test_an_existing_policy_is_kept_intact(tmp_path):
    policy = tmp_path / "policy-rc.d"
    policy.write_text("#!/bin/sh\n# the admin's own\nexit 0\n")
    policy.chmod(0o750)
    proc, seen = run_setup(tmp_path, policy)
    assert proc.returncode == 100, proc.stderr
    assert seen.startswith("#!/bin/sh\nexit 101\n")
    assert policy.read_text() == "#!/bin/sh\n# the admin's own\nexit 0\n"
    assert policy.stat().st_mode & 0o777 == 0o750
    assert [p.name for p in tmp_path.glob("policy-rc.d*")] == ["policy-rc.d"]  # no leftovers
