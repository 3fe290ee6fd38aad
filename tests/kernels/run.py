"""tests/kernels/run.py: boot other kernels under qemu and run a subset of the real suite.

usage: python tests/kernels/run.py [--suite smoke|full] [--kernel PKG ...] [--timeout S]

Each kernel in tests/kernels/kernels.txt (or --kernel, or $DEEPTRACE_KERNELS, comma
separated; "none" runs nothing) is downloaded as Debian packages (image, headers) with
`apt-get download`, extracted under /var/cache/deeptrace/kernels (nothing is installed on
the host) and booted with qemu's software emulation (KVM hangs on these machines). The
guest sees this machine's / read-only (9p, or virtiofs where the kernel has no 9p) under a
tmpfs overlay, so it runs this very checkout, its .venv and the Debian servers the tests
start, and gets an ext4 disk on virtio-blk for the disk probe; inside it mounts tracefs,
debugfs and bpffs, binds the kernel's modules and headers, runs `deeptrace doctor` and the
suite's chosen tests (CI=true: BPF that cannot load is a failure), and powers off. A
second share, writable, brings back doctor's report, the pytest log and JUnit XML
(build/kernels/<version>/). Exit status: 0 only if every kernel passed.
"""

import argparse
import lzma
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CACHE = os.environ.get("DEEPTRACE_KERNEL_CACHE", "/var/cache/deeptrace/kernels")
BUSYBOX = "/bin/busybox"   # Debian's busybox-static: a static binary, so it runs in /init

# What runs inside each kernel. Every item is the real test, unchanged: the kernel job
# only chooses. smoke: doctor and the kernel feature probes, the agent from the command
# line end to end (SIGTERM detaches), the trace probe with every protocol detector
# over real requests, and its asyncio uprobes and loop counter.
SUITES = {
    "smoke": [
        "tests/test_cli.py::test_doctor_and_render",
        "tests/test_features.py",
        "tests/test_cli.py::test_example_config_end_to_end_and_sigterm_detaches",
        "tests/test_l7_e2e.py::test_http1_python_server_keepalive_post_and_big_body",
        # the asyncio uprobes (loaded only once an _asyncio file is found) and loop_iter
        "tests/test_asyncio_linking.py::test_records_carry_the_task_that_made_them[py3.11]",
        "tests/test_asyncio_linking.py::test_loop_iter_counts_epoll_returns_exactly",
    ],
    "full": [
        "tests/test_cli.py::test_doctor_and_render",
        "tests/test_features.py",
        "tests/test_cli.py::test_example_config_end_to_end_and_sigterm_detaches",
        "tests/test_trace_syscalls.py",
        "tests/test_trace_confine.py",
        "tests/test_go_linking.py::test_write_loop_write_is_the_callers",
        "tests/test_go_linking.py::test_goid_is_right_when_a_new_goroutine_reuses_a_g",
        "tests/test_btf.py",
        "tests/test_asyncio_linking.py",
        # one end-to-end test per protocol family, each against its real server
        "tests/test_l7_e2e.py::test_http1_nginx_and_curl",
        "tests/test_l7_e2e.py::test_grpc_unary_and_20_concurrent_calls_on_one_connection",
        "tests/test_l7_e2e.py::test_redis_commands_and_errors",
        "tests/test_l7_e2e.py::test_postgresql_simple_extended_pipelined_and_error",
        "tests/test_l7_e2e.py::test_mysql_query_prepared_and_error",
        "tests/test_l7_e2e.py::test_mongodb_op_msg_against_a_stand_in_responder",
        "tests/test_l7_e2e.py::test_dns_over_udp_and_tcp",
        "tests/test_l7_e2e.py::test_memcached_text",
        # the system probes
        "tests/test_cpu_probe.py",
        "tests/test_memory_probe.py",
        "tests/test_disk_probe.py",
        "tests/test_network_probe.py",
    ],
}
# Left out under emulation: it compares two CPU hogs' shares of one core, and TCG's vCPU
# threads share the host's cores with everything else (it runs on the host).
DESELECT = ["tests/test_cpu_probe.py::test_two_hogs_pinned_to_one_core_share_it"]
# Software emulation runs BPF compiles ~15x slower than the host: sized for that.
TIMEOUTS = {"smoke": 900, "full": 3600}
# How the guest reaches this machine's files: 9p where the kernel has it, else virtiofs
# (Debian's cloud flavour has no 9p) served by qemu's virtiofsd. Per transport, the
# modules the initramfs loads (with their dependencies from modules.dep; a built-in one is
# skipped) and the mount.
_9P = "mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000"
TRANSPORTS = {   # modules, mount of the (read-only) root, mount of the results
    "9p": (["virtio_pci", "9pnet_virtio", "9p", "overlay"], f"{_9P},ro,cache=loose", _9P),
    "virtiofs": (["virtio_pci", "virtiofs", "overlay"], "mount -t virtiofs -o ro",
                 "mount -t virtiofs"),
}
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"   # from qemu-system-common
DISK_MB = 512   # the ext4 disk (inside.sh mounts it): the disk probe needs a real one


def log(msg):
    print(f"kernels: {msg}", flush=True)


def sh(*argv, cwd=None):
    return subprocess.run(argv, cwd=cwd, check=True, capture_output=True, text=True).stdout


def wanted_kernels(args):
    if args.kernel:
        return args.kernel
    env = os.environ.get("DEEPTRACE_KERNELS")
    if env is not None:
        return [] if env.strip() == "none" else [k.strip() for k in env.split(",") if k.strip()]
    with open(os.path.join(HERE, "kernels.txt")) as f:
        return [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]


def apt_depends(spec):
    """The packages `spec` (name or name=version) depends on, as apt-cache shows them."""
    out = sh("apt-cache", "depends", spec)
    return [m.group(1) for m in re.finditer(r"^\s+Depends: (\S+)", out, re.M)]


def resolve(spec):
    """The exact image package of `spec` (a meta package resolves to what it depends on)
    and its version."""
    name = spec.split("=")[0]
    if not re.match(r"linux-image-\d", name):
        deps = [d for d in apt_depends(spec) if d.startswith("linux-image-")]
        if not deps:
            raise SystemExit(f"kernels: {spec}: depends on no linux-image package")
        name = deps[0]
    m = re.match(r"linux-image-(.+?)(-unsigned)?$", name)
    return name, m.group(1)


def fetch(spec):
    """Download and extract image + headers of `spec`; return (kernel version, root)."""
    image, version = resolve(spec)
    root = os.path.join(CACHE, version, "root")
    stamp = os.path.join(CACHE, version, ".ready")
    if os.path.exists(stamp):
        return version, root
    log(f"{spec}: fetching {image} and its headers")
    headers = f"linux-headers-{version}"
    pkgs = [image, headers] + [d for d in apt_depends(headers)
                               if d.startswith(("linux-headers-", "linux-kbuild-"))]
    debs = os.path.join(CACHE, version, "debs")
    shutil.rmtree(os.path.join(CACHE, version), ignore_errors=True)
    os.makedirs(debs)
    os.chmod(debs, 0o777)   # apt's _apt user downloads into it
    try:
        sh("apt-get", "download", *pkgs, cwd=debs)
    except subprocess.CalledProcessError:
        subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True)
        sh("apt-get", "download", *pkgs, cwd=debs)
    for deb in sorted(os.listdir(debs)):
        sh("dpkg-deb", "-x", os.path.join(debs, deb), root)
    shutil.rmtree(debs)
    # The packages' build/source links name /usr/src of an installed system: point them
    # at the extracted trees (whose own relative links then resolve inside root).
    moddir = os.path.join(root, "lib/modules", version)
    common = [d for d in os.listdir(os.path.join(root, "usr/src")) if d.endswith("-common")]
    for link, target in (("build", f"linux-headers-{version}"),
                         ("source", common[0] if common else f"linux-headers-{version}")):
        path = os.path.join(moddir, link)
        if os.path.lexists(path):
            os.remove(path)
        os.symlink(os.path.join(root, "usr/src", target), path)
    sh("depmod", "-b", root, version)
    open(stamp, "w").close()
    return version, root


def transport(root, version):
    """9p if the kernel was built with it, else virtiofs."""
    with open(os.path.join(root, "boot", f"config-{version}")) as f:
        config = f.read()
    if re.search(r"^CONFIG_9P_FS=[ym]", config, re.M) and \
            re.search(r"^CONFIG_NET_9P_VIRTIO=[ym]", config, re.M):
        return "9p"
    if re.search(r"^CONFIG_VIRTIO_FS=[ym]", config, re.M):
        return "virtiofs"
    raise SystemExit(f"kernels: {version} has neither 9p nor virtiofs: cannot share files")


def module_files(root, version, wanted):
    """The .ko files the modules `wanted` need, dependencies first; built-ins skipped."""
    moddir = os.path.join(root, "lib/modules", version)
    deps = {}
    with open(os.path.join(moddir, "modules.dep")) as f:
        for line in f:
            path, _, rest = line.partition(":")
            deps[os.path.basename(path).split(".ko")[0].replace("-", "_")] = (path, rest.split())
    by_path = {p: n for n, (p, _) in deps.items()}
    order = []

    def add(name):
        if name not in deps:
            return   # built in
        path, needs = deps[name]
        for dep in reversed(needs):   # modules.dep lists the deepest dependency last
            add(by_path[dep])
        if path not in order:
            order.append(path)
    for name in wanted:
        add(name.replace("-", "_"))
    return [os.path.join(moddir, p) for p in order]


def cpio_newc(entries):
    """An uncompressed initramfs (cpio 'newc'); entries: (name, mode, data)."""
    out = bytearray()
    for ino, (name, mode, data) in enumerate(entries + [("TRAILER!!!", 0, b"")], 1):
        nb = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0]
        out += b"070701" + b"".join(b"%08X" % v for v in fields) + nb
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


INIT = r"""#!/bin/busybox sh
# /init of the test initramfs: reach the host's / over 9p, put a tmpfs overlay on it,
# chroot into it and run the suite there, then power off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in /modules/*.ko; do insmod "$m" || echo "kernels: insmod $m failed"; done
mkdir -p /lower /upper /newroot
@ROOT_MOUNT@ hostroot /lower || { echo "kernels: cannot mount the host's /"; poweroff -f; }
mount -t tmpfs -o size=3g tmpfs /upper
mkdir -p /upper/u /upper/w
mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w /newroot
mkdir -p /newroot/dt-results
@RESULTS_MOUNT@ results /newroot/dt-results
# The kernel runs modprobe (veth, nftables, ... on first use) as a child of this root,
# not of the chroot: hand those requests to the chroot's modprobe.
printf '#!/bin/busybox sh\nexec /bin/busybox chroot /newroot /sbin/modprobe "$@"\n' > /bin/modprobe-newroot
chmod +x /bin/modprobe-newroot
echo /bin/modprobe-newroot > /proc/sys/kernel/modprobe
chroot /newroot /bin/bash @REPO@/tests/kernels/inside.sh @REPO@ @KROOT@ @SUITE@
sync
poweroff -f
"""


def initramfs(path, root, version, suite, how):
    modules, root_mount, results_mount = TRANSPORTS[how]
    entries = [("bin", 0o40755, b""), ("proc", 0o40755, b""), ("sys", 0o40755, b""),
               ("dev", 0o40755, b""), ("modules", 0o40755, b"")]
    with open(BUSYBOX, "rb") as f:
        entries.append(("bin/busybox", 0o100755, f.read()))
    init = (INIT.replace("@REPO@", REPO).replace("@KROOT@", root).replace("@SUITE@", suite)
            .replace("@ROOT_MOUNT@", root_mount).replace("@RESULTS_MOUNT@", results_mount))
    entries.append(("init", 0o100755, init.encode()))
    for i, ko in enumerate(module_files(root, version, modules)):
        with open(ko, "rb") as f:
            data = f.read()
        if ko.endswith(".xz"):
            data = lzma.decompress(data)   # busybox insmod takes plain .ko only
        name = os.path.basename(ko).split(".ko")[0]
        entries.append((f"modules/{i:02d}-{name}.ko", 0o100644, data))
    with open(path, "wb") as f:
        f.write(cpio_newc(entries))


def junit_counts(path):
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failed = []
    if not os.path.exists(path):
        return counts, failed
    for case in ET.parse(path).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        if kinds & {"failure", "error"}:
            counts["failed"] += 1
            failed.append(f"{case.get('classname')}::{case.get('name')}")
        elif "skipped" in kinds:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts, failed


def boot(spec, suite, timeout):
    """Boot one kernel, run the suite inside; returns (ok, test counts, summary)."""
    version, root = fetch(spec)
    out = os.path.join(REPO, "build", "kernels", version)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    how = transport(root, version)
    initrd = os.path.join(out, "initramfs.cpio")
    initramfs(initrd, root, version, suite, how)
    disk = os.path.join(out, "disk.img")
    with open(disk, "wb") as f:
        f.truncate(DISK_MB << 20)
    sh("mkfs.ext4", "-q", "-F", disk)
    argv = ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-cpu", "max",
            "-smp", "2", "-m", "4G", "-nographic", "-no-reboot", "-nic", "none",
            "-kernel", os.path.join(root, "boot", f"vmlinuz-{version}"), "-initrd", initrd,
            "-append", "console=ttyS0 panic=-1 quiet loglevel=3 mitigations=off",
            "-drive", f"file={disk},if=virtio,format=raw"]
    daemons = []
    if how == "9p":
        argv += ["-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,"
                 "readonly=on,multidevs=remap",
                 "-virtfs", f"local,path={out},mount_tag=results,security_model=none"]
    else:
        # vhost-user devices need the guest's memory shared with the daemons.
        argv += ["-object", "memory-backend-memfd,id=mem,size=4G,share=on",
                 "-numa", "node,memdev=mem"]
        for tag, source in (("hostroot", "/"), ("results", out)):
            sock = os.path.join(out, f"{tag}.sock")
            with open(os.path.join(out, f"{tag}.vfsd.log"), "w") as vlog:
                daemons.append(subprocess.Popen(
                    [VIRTIOFSD, f"--socket-path={sock}", "-o", f"source={source}",
                     "-o", "cache=always", "-o", "sandbox=chroot"],
                    stdout=subprocess.DEVNULL, stderr=vlog))
            deadline = time.monotonic() + 10
            while not os.path.exists(sock) and time.monotonic() < deadline:
                time.sleep(0.05)
            argv += ["-chardev", f"socket,id={tag},path={sock}",
                     "-device", f"vhost-user-fs-pci,chardev={tag},tag={tag}"]
    log(f"{version}: booting ({suite} suite over {how}, timeout {timeout} s)")
    start = time.monotonic()
    try:
        with open(os.path.join(out, "console.log"), "w") as console:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, errors="replace")
            # A guest that hangs prints nothing: the watchdog kills qemu, which ends the
            # read below.
            watchdog = threading.Timer(timeout, proc.kill)
            watchdog.start()
            try:
                for line in proc.stdout:
                    console.write(line)
                    print(f"[{version}] {line.rstrip()}", flush=True)
                proc.wait()
            finally:
                watchdog.cancel()
            if time.monotonic() - start >= timeout:
                return False, junit_counts("")[0], (f"{version}: timed out after {timeout} s "
                                                     f"(console: {out}/console.log)")
    finally:
        for d in daemons:
            d.terminate()
            d.wait()
        os.remove(disk)
    took = time.monotonic() - start
    counts, failed = junit_counts(os.path.join(out, "junit.xml"))
    rc = open(os.path.join(out, "rc")).read().strip() if os.path.exists(
        os.path.join(out, "rc")) else "none (the guest did not finish)"
    ok = rc == "0" and counts["passed"] > 0 and not failed
    summary = (f"{version}: {'PASS' if ok else 'FAIL'} in {took:.0f} s: {counts['passed']} "
               f"passed, {counts['failed']} failed, {counts['skipped']} skipped (pytest rc "
               f"{rc}; results in {out})")
    for name in failed:
        summary += f"\n  failed: {name}"
    return ok, counts, summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", choices=sorted(SUITES), default="full")
    ap.add_argument("--kernel", action="append", help="a Debian kernel package (repeatable)")
    ap.add_argument("--timeout", type=int, help="seconds per kernel (default by suite)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("kernels: must run as root (apt-get download, depmod, qemu's 9p)", file=sys.stderr)
        return 1
    kernels = wanted_kernels(args)
    if not kernels:
        log("no kernels chosen (DEEPTRACE_KERNELS=none): nothing run")
        return 0
    for tool in ("qemu-system-x86_64", BUSYBOX, VIRTIOFSD, "apt-get", "dpkg-deb", "depmod",
                 "mkfs.ext4"):
        if not shutil.which(tool):
            print(f"kernels: {tool} not found (scripts/setup.sh installs it)", file=sys.stderr)
            return 1
    results = [boot(k, args.suite, args.timeout or TIMEOUTS[args.suite]) for k in kernels]
    for _, _, summary in results:
        log(summary)
    # Tests across all kernels; a kernel that failed with no failed test (it timed out, or
    # pytest never ran) counts as one failure.
    passed = sum(c["passed"] for _, c, _ in results)
    failed = sum(max(c["failed"], not ok) for ok, c, _ in results)
    print(f"kernels: {passed} passed, {failed} failed", flush=True)
    return 0 if all(ok for ok, _, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
