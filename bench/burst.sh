#!/usr/bin/env bash
# Burst: N `sleep` containers through one agent (Mesos 1.7 published ≈30 s
# to launch and ≈20 s to destroy 1,000). Goals: all RUNNING in ≤ 10 s, all
# destroyed in ≤ 8 s, agent RSS ≤ 30 MiB while holding them.
# Usage: bench/burst.sh [N]   (root: the agent creates cgroups/namespaces)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000}
[ "$(id -u)" -eq 0 ] || { echo "bench/burst.sh: run as root (containers need cgroups and namespaces)" >&2; exit 1; }

cargo build --release --locked -p corral-cli --bin corral >&2
cargo build --release --locked -p corral-tests --example burst >&2
BIN=target/release
WORK=$(mktemp -d)
MASTER_PORT=15050
AGENT_PORT=15051
cleanup() {
    kill "${AGENT_PID:-}" "${MASTER_PID:-}" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

"$BIN/corral" master --listen 127.0.0.1:$MASTER_PORT --work-dir "$WORK/master" --allocation-interval 200ms >"$WORK/master.log" 2>&1 &
MASTER_PID=$!
"$BIN/corral" agent --master 127.0.0.1:$MASTER_PORT --listen 127.0.0.1:$AGENT_PORT \
    --work-dir "$WORK/agent" --cgroup-root corral-burst \
    --resources "cpus:64;mem:65536" >"$WORK/agent.log" 2>&1 &
AGENT_PID=$!
for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$MASTER_PORT/state" | grep -q '"state":"connected"' && break
    sleep 0.1
done
"$BIN/examples/burst" 127.0.0.1:$MASTER_PORT "$AGENT_PID" "$N" 127.0.0.1:$AGENT_PORT
