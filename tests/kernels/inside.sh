#!/bin/bash
# inside.sh REPO KROOT SUITE: runs in the guest kernel, chrooted into the overlay of the
# host's /. Mounts what the agent needs, links the guest kernel's modules and headers,
# then runs doctor and the suite's tests; results go to /dt-results (a 9p or virtiofs
# share). /tmp stays on the overlay: a checkout under /tmp (a CI clone) must stay visible.
repo=$1 kroot=$2 suite=$3
out=/dt-results
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
       CI=true LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 TMPDIR=/tmp
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mount -t tracefs nodev /sys/kernel/tracing
mount -t debugfs nodev /sys/kernel/debug
mount -t bpf bpf /sys/fs/bpf
mount -t cgroup2 none /sys/fs/cgroup
ip link set lo up
hostname "guest-$(uname -r)"
ver=$(uname -r)
# A bind, not a link: the host may have a /lib/modules/$ver of its own (the headers
# package makes one for build/), which a link would land inside.
mkdir -p "/lib/modules/$ver"
mount --bind "$kroot/lib/modules/$ver" "/lib/modules/$ver"
# the ext4 disk run.py attached: a real block device for the disk probe
modprobe -a virtio_blk ext4
for _ in $(seq 50); do [ -b /dev/vda ] && break; sleep 0.1; done   # probed asynchronously
disk=/var/tmp   # one of the folders tests/test_disk_probe.py looks in; never over the repo
case "$repo/" in /var/tmp/*) disk=/tmp ;; esac
mount /dev/vda "$disk" || echo "kernels: no disk at /dev/vda"
echo "kernels: guest $ver up; running the $suite suite"
cd "$repo" || exit 1
.venv/bin/deeptrace doctor > "$out/doctor.txt" 2>&1
cat "$out/doctor.txt"
tests=$(.venv/bin/python -c "import sys; sys.path.insert(0, 'tests/kernels'); import run; print(' '.join(run.SUITES['$suite'] + ['--deselect=' + t for t in run.DESELECT]))")
# -p no:cacheprovider: the checkout is the host's, read-only under the overlay
.venv/bin/python -m pytest -v -p no:cacheprovider --junitxml="$out/junit.xml" $tests \
    > "$out/pytest.log" 2>&1 &
pid=$!
tail -n +1 -f "$out/pytest.log" --pid=$pid
wait $pid
echo $? > "$out/rc"
echo "kernels: pytest exited $(cat "$out/rc")"
