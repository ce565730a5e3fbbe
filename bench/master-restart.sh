#!/usr/bin/env bash
# Master restart (issue 6): 2,000 simulated agents × 50 running tasks in the
# registry; the master is stopped and started again on the same work dir,
# and the time until every agent has re-registered is measured. Goal:
# <= 10 s on a 2-core machine.
#
# Usage: bench/master-restart.sh [AGENTS] [TASKS_PER_AGENT]   (default 2000 50)
#
# The agents are gRPC streams speaking the agent protocol
# (tests/examples/master_restart.rs), 100 to a connection, retrying every
# 100 ms to 1 s like real agents while the master is down. The master is the
# real `corral master` process. The last line is
# `agents=A tasks=T recovered_s=R reregistered_s=X`: R from the new master's
# start until it accepts connections (registry read), X until the last agent
# is registered again.
set -euo pipefail
cd "$(dirname "$0")/.."
AGENTS=${1:-2000}
TASKS=${2:-50}
cargo build --release --locked -p corral-cli --bin corral >&2
cargo build --release --locked -p corral-tests --example master_restart >&2
WORK=$(mktemp -d /tmp/corral-master-restart.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
ulimit -n 65536 2>/dev/null || true
./target/release/examples/master_restart "$PWD/target/release/corral" "$WORK/master" "$AGENTS" "$TASKS"
