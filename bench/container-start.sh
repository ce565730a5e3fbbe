#!/usr/bin/env bash
# Container start latency: the agent's containerizer vs `crun run` and
# `runc run` on the same busybox rootfs (create + run /bin/true to exit +
# destroy, medians over N interleaved iterations). Goal: ours <= 0.5x crun.
#
# Usage: bench/container-start.sh [N]          (root; default N=200)
# Last line: container_start_median_ms=X crun_median_ms=Y runc_median_ms=Z ratio_vs_crun=R
#
# Ours creates fresh overlay upper/work dirs per container next to the
# rootfs (on disk) and removes them, inside the timed region; a second,
# informational row repeats it with upper/work on tmpfs to separate the
# runtime's cost from the disk's metadata latency. crun/runc use the
# `runc spec` defaults (readonly root bind) minus the network namespace
# (ours shares the host network too), with the same cgroup limits.
#
# crun refuses this hybrid cgroup host while the cgroup2 mount at
# /sys/fs/cgroup/unified has controllers, so the whole bench (all three
# runtimes alike) runs in ONE private mount namespace with that mount
# removed: the unshare is paid once, not per container.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-200}
[ "$(id -u)" -eq 0 ] || { echo "bench/container-start.sh: run as root (cgroups, namespaces, mounts)" >&2; exit 1; }

missing=()
command -v crun >/dev/null || missing+=(crun)
command -v runc >/dev/null || missing+=(runc)
[ -x /bin/busybox ] || missing+=(busybox-static)
if [ ${#missing[@]} -gt 0 ]; then
    apt-get install -y "${missing[@]}" >&2 || { apt-get update >&2 && apt-get install -y "${missing[@]}" >&2; }
fi

cargo build --release -p corral-agent --example container_start_bench >&2
BENCH=$PWD/target/release/examples/container_start_bench

WORK=$(mktemp -d /tmp/corral-container-start.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/rootfs/bin" "$WORK/rootfs/proc" "$WORK/rootfs/sys" "$WORK/rootfs/dev" \
         "$WORK/rootfs/tmp" "$WORK/rootfs/etc" "$WORK/rootfs/root"
cp /bin/busybox "$WORK/rootfs/bin/busybox"
chroot "$WORK/rootfs" /bin/busybox --install -s /bin
# The example writes the OCI bundle (runc spec defaults, patched) under "$WORK/run".

OUT=$(unshare -m sh -c '
    mount --make-rprivate /
    if grep -q " /sys/fs/cgroup/unified " /proc/self/mountinfo; then umount /sys/fs/cgroup/unified; fi
    exec "$@"' bench "$BENCH" "$WORK/rootfs" "$N" "$WORK/run")
echo "$OUT" | sed '$d'
echo "$OUT" | tail -n 1
