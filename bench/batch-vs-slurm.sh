#!/usr/bin/env bash
# Batch throughput (performance anchors B5): N `/bin/true` tasks (cpus 0.1,
# mem 16 MiB) through the batch framework on one agent of this machine, from
# submission until the job has succeeded, against Slurm 22.05 on the same
# machine in the same run (bench/slurm.sh, tuned: sched_interval=1).
# Goals: >= 300 tasks/s with cgroup-isolated containers (>= 10x Slurm) and
# >= 100 tasks/s with image containers.
#
# Usage: bench/batch-vs-slurm.sh [N]      (root; default N=10000)
#   N_IMAGE=...     image-container tasks (default N)
#   SKIP_SLURM=1    Corral only (the last line then has no ratio)
#
# Corral runs as three processes, as deployed: master, agent (default
# resource detection: this machine's cores, so 20 tasks of 0.1 cpus run at
# once) and `corral batch serve`, all at RUST_LOG=warn. The image tasks use a
# one-layer busybox image imported into the agent's store.
# The last line is `tasks_per_second=X slurm_jobs_per_second=Y ratio=R`,
# X for the cgroup-isolated containers, R = X / Y.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10000}
N_IMAGE=${N_IMAGE:-$N}
[ "$(id -u)" -eq 0 ] || { echo "bench/batch-vs-slurm.sh: run as root (containers need cgroups and namespaces)" >&2; exit 1; }
[ -x /bin/busybox ] || { echo "bench/batch-vs-slurm.sh: needs /bin/busybox: apt-get install busybox-static" >&2; exit 1; }

cargo build --release --locked -p corral-cli --bin corral >&2
BIN=$PWD/target/release/corral
WORK=$(mktemp -d /tmp/corral-batch-bench.XXXXXX)
MASTER=127.0.0.1:15150
AGENT=127.0.0.1:15151
BATCH=127.0.0.1:15160
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

export RUST_LOG=warn
"$BIN" master --listen $MASTER --work-dir "$WORK/master" >"$WORK/master.log" 2>&1 &
PIDS+=($!)
"$BIN" agent --master $MASTER --listen $AGENT --work-dir "$WORK/agent" \
    --cgroup-root corral-batch-bench >"$WORK/agent.log" 2>&1 &
PIDS+=($!)
"$BIN" batch serve --master $MASTER --listen $BATCH --work-dir "$WORK/batch" >"$WORK/batch.log" 2>&1 &
PIDS+=($!)
export CORRAL_BATCH=$BATCH
for _ in $(seq 100); do
    "$BIN" agents --master $MASTER 2>/dev/null | grep -q connected && "$BIN" batch list >/dev/null 2>&1 && break
    sleep 0.1
done
"$BIN" agents --master $MASTER | grep -q connected || { echo "agent did not register; logs in $WORK" >&2; tail "$WORK"/*.log >&2; exit 1; }

# A docker-save archive of busybox: one layer, `docker load` layout.
mkdir -p "$WORK/image/rootfs/bin"
cp /bin/busybox "$WORK/image/rootfs/bin/busybox"
for tool in sh true echo sleep; do ln -s busybox "$WORK/image/rootfs/bin/$tool"; done
tar -C "$WORK/image/rootfs" -cf "$WORK/image/layer.tar" .
DIFF_ID=$(sha256sum "$WORK/image/layer.tar" | cut -d' ' -f1)
cat >"$WORK/image/config.json" <<EOF
{"architecture":"amd64","os":"linux","config":{"Cmd":["/bin/sh"]},"rootfs":{"type":"layers","diff_ids":["sha256:$DIFF_ID"]}}
EOF
echo '[{"Config":"config.json","RepoTags":["bench/busybox:1"],"Layers":["layer.tar"]}]' >"$WORK/image/manifest.json"
tar -C "$WORK/image" -cf "$WORK/busybox.tar" manifest.json config.json layer.tar
"$BIN" image import "$WORK/busybox.tar" --name bench/busybox:1 --agent $AGENT >/dev/null

# Runs one job of $2 tasks; prints tasks/s. $1: name, rest: submit flags.
run_job() {
    local name=$1 count=$2
    shift 2
    local start end
    start=$(date +%s.%N)
    "$BIN" batch submit --name "$name" --count "$count" --cpus 0.1 --mem 16 "$@" >/dev/null
    "$BIN" batch wait "$name" >/dev/null 2>&1 || { echo "job $name failed:" >&2; "$BIN" batch status "$name" >&2; exit 1; }
    end=$(date +%s.%N)
    awk -v n="$count" -v s="$start" -v e="$end" 'BEGIN { printf "%.1f", n / (e - s) }'
}

# Warm-up (first container and first offer cycle), not counted.
run_job warmup 50 -- /bin/true >/dev/null
echo "corral: $N cgroup-isolated containers (host root filesystem)..." >&2
CGROUP_RATE=$(run_job containers "$N" -- /bin/true)
echo "corral: $N_IMAGE image containers (bench/busybox:1)..." >&2
IMAGE_RATE=$(run_job images "$N_IMAGE" --image bench/busybox:1 -- /bin/true)
AGENT_RSS=$(awk '/VmHWM/ {print $2}' /proc/"${PIDS[1]}"/status)
for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
wait 2>/dev/null || true
PIDS=()

if [ "${SKIP_SLURM:-}" = 1 ]; then
    printf '\n%-44s %10s\n' "what" "tasks/s"
    printf '%-44s %10s\n' "corral, cgroup-isolated containers" "$CGROUP_RATE"
    printf '%-44s %10s\n' "corral, image containers" "$IMAGE_RATE"
    echo "tasks_per_second=$CGROUP_RATE image_tasks_per_second=$IMAGE_RATE"
    exit 0
fi

echo "slurm: $N jobs (bench/slurm.sh, tuned)..." >&2
SLURM_OUT=$(bash bench/slurm.sh "$N")
SLURM_RATE=$(echo "$SLURM_OUT" | tail -1 | sed -n 's/^slurm_jobs_per_second=//p')
[ -n "$SLURM_RATE" ] || { echo "bench/slurm.sh gave no rate:" >&2; echo "$SLURM_OUT" >&2; exit 1; }
RATIO=$(awk -v a="$CGROUP_RATE" -v b="$SLURM_RATE" 'BEGIN { printf "%.2f", a / b }')
IMAGE_RATIO=$(awk -v a="$IMAGE_RATE" -v b="$SLURM_RATE" 'BEGIN { printf "%.2f", a / b }')

printf '\n%-44s %10s %10s\n' "what ($N tasks, one 2-core node)" "tasks/s" "vs slurm"
printf '%-44s %10s %10s\n' "corral, cgroup-isolated containers" "$CGROUP_RATE" "${RATIO}x"
printf '%-44s %10s %10s\n' "corral, image containers" "$IMAGE_RATE" "${IMAGE_RATIO}x"
printf '%-44s %10s %10s\n' "slurm 22.05, sched_interval=1" "$SLURM_RATE" "1.00x"
echo "corral agent peak RSS: $((AGENT_RSS / 1024)) MiB"
echo "tasks_per_second=$CGROUP_RATE slurm_jobs_per_second=$SLURM_RATE ratio=$RATIO"
