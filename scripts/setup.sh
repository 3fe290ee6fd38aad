#!/usr/bin/env bash
# setup.sh: idempotent machine + project set-up for DeepTrace (used by make run/test and .ci/run).
# Installs Debian packages, mounts tracefs/debugfs, links kernel headers for BCC when the
# running kernel has none, and builds .venv (which sees Debian's bcc and nothing else of it).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "setup.sh: must run as root (installs packages, mounts tracefs)" >&2
  exit 1
fi

# Debian packages: BCC and its headers, BTF oracle (pahole), bpftool, and the real
# servers/tools the tests and benchmarks drive.
PKGS=(python3-bpfcc bpfcc-tools libbpfcc linux-headers-amd64 dwarves bpftool
      iproute2 nftables iptables curl make gcc procps kmod
      redis-server memcached nginx-light mariadb-server postgresql wrk hyperfine
      golang-go   # Go crypto/tls peers, built by tests/test_tls_go.py
      nodejs      # Node.js services: the event-loop tests and fronts, TLS peers
      python3-grpcio   # gRPC over TLS on the system OpenSSL (the wheel's BoringSSL exports no SSL_*)
      qemu-system-x86 busybox-static   # these two: the kernel test job (tests/kernels)
      chromium chromium-driver)          # the web UI tests (tests/test_ui*.py)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup.sh: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  # policy-rc.d keeps the package scripts from starting services; tests start their own.
  # The machine's own policy-rc.d (if any) is moved aside and put back, and ours is removed
  # however apt-get ends (failure, Ctrl-C): the trap runs on every exit.
  policy=${DEEPTRACE_POLICY_RC_D:-/usr/sbin/policy-rc.d}   # the variable: for tests only
  policy_saved=
  restore_policy() {
    if [ -n "$policy_saved" ]; then
      mv -f "$policy_saved" "$policy"
    else
      rm -f "$policy"
    fi
    trap - EXIT INT TERM
  }
  trap restore_policy EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  if [ -e "$policy" ] || [ -L "$policy" ]; then
    saved=$(mktemp "$policy.deeptrace-saved.XXXXXX")
    mv -f "$policy" "$saved"
    policy_saved=$saved   # only now: a restore must never move the empty temp file back
  fi
  printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"
  apt-get install -y -q --no-install-recommends "${missing[@]}"
  restore_policy
fi

# tracefs/debugfs are present but not mounted at boot here.
mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing
mountpoint -q /sys/kernel/debug || mount -t debugfs nodev /sys/kernel/debug || true

# BCC compiles against /lib/modules/$(uname -r)/build. Only when the running kernel has no
# headers, link the newest installed Debian headers as build and source. Their struct
# layouts are wrong for this kernel: our BPF C reads kernel structs only at BTF offsets.
moddir=/lib/modules/$(uname -r)
if [ ! -e "$moddir/build/Makefile" ] || [ ! -e "$moddir/source/include/linux/kconfig.h" ]; then
  # Debian splits headers: -amd64 (generated, "build") and -common (the tree, "source").
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$hdr" ]; then
    echo "setup.sh: no kernel headers found under /usr/src" >&2; exit 1
  fi
  common=${hdr%-amd64}-common
  [ -d "$common" ] || common=$hdr
  mkdir -p "$moddir"
  ln -sfn "$hdr" "$moddir/build"
  ln -sfn "$common" "$moddir/source"
  echo "setup.sh: linked $hdr as $moddir/build and $common as $moddir/source"
fi

# The venv: pyenv's python3, plus Debian's pure-Python bcc package exposed by a symlink.
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"
stamp=.venv/.deeptrace-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ] \
   || [ plugins/protocols/redis/pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip wheel  # wheel: --no-build-isolation reinstalls in tests
  .venv/bin/python -m pip install -q -e '.[test,collector,fuzz]'
  # Our Redis plugin is its own distribution, found only through its entry point.
  .venv/bin/python -m pip install -q -e plugins/protocols/redis
  touch "$stamp"
fi
# Byte-compile our sources: with PYTHONDONTWRITEBYTECODE set (as on CI) every start would
# compile them again (~0.1 s of the agent's start-up).
.venv/bin/python -m compileall -q deeptrace_core plugins >/dev/null
.venv/bin/python -c 'import bcc, deeptrace_core' || { echo "setup.sh: venv cannot import bcc/deeptrace_core" >&2; exit 1; }
echo "setup.sh: ready (.venv, BCC headers at $moddir/build, tracefs mounted)"
