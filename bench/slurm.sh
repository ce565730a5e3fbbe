#!/usr/bin/env bash
# Slurm baseline for B5 (end-to-end short-task throughput on one node), as in
# shared/reference/performance-anchors.md §6: Debian's slurm 22.05, one
# slurmctld and one slurmd on this box, no systemd, no accounting.
# LOCAL anchors: ≈27–33 jobs/s with `sched_interval=1`, ≈10–13 jobs/s default.
#
# Usage: bench/slurm.sh [N]        (root; N jobs, default 10000; N=200 is a
#                                   quick check, N=10000 takes ≈6 min tuned)
#   SLURM_PROFILE=tuned|default    tuned (default): SchedulerType=sched/builtin,
#                                  PriorityType=priority/basic and
#                                  SchedulerParameters=sched_interval=1;
#                                  default: Slurm's default scheduler
#                                  (sched/backfill, no SchedulerParameters).
#                                  Both: HTC settings from the anchors (no
#                                  accounting, jobacct_gather/none, jobcomp/none,
#                                  no job-submit plugin or PrologSlurmctld, logs at
#                                  error, munged --num-threads=10).
#   SLURM_SCHED_PARAMS=...         override SchedulerParameters (tuned only)
#   SLURM_SUBMITTERS=4             parallel sbatch loops
#   SLURM_CPUS=32                  CPUs declared for the node (config_overrides)
#   SLURM_MIN_JOB_AGE=86400        kept large so every job id can be checked
#                                  at the end (22.05 clamps 0 to 2 s); a small
#                                  value (HTC advice) changed nothing at N=2000
#   SLURM_CTLD_PORT=16817 SLURM_SLURMD_PORT=16818
#   SLURM_TIMEOUT=seconds          bound on waiting for completion (default
#                                  120+N); also fails after 120 s without progress
#
# Everything lives in a private temp dir: slurm.conf/cgroup.conf (reached via
# SLURM_CONF), state, spool, logs and a private munged (copy of the system key
# or a fresh one, own socket, pid, log and seed file). /etc/slurm and any
# system munged or slurm are not touched. Each job is
# `sbatch --parsable -o /dev/null -c 1 --mem=16M --wrap=/bin/true` (Slurm cannot
# give fractional CPUs: each takes 1 of the 32 declared CPUs). The clock runs
# from just before the first sbatch until squeue shows no job left (polled
# every 0.2 s); then every accepted job id must be on record as COMPLETED.
# All daemons, slurmstepds and jobs carry an environment marker and are
# stopped by pid on exit, success or failure. The last line printed is
# `slurm_jobs_per_second=Y`.
set -euo pipefail

N=${1:-10000}
PROFILE=${SLURM_PROFILE:-tuned}
SUBMITTERS=${SLURM_SUBMITTERS:-4}
CPUS=${SLURM_CPUS:-32}
CTLD_PORT=${SLURM_CTLD_PORT:-16817}
SLURMD_PORT=${SLURM_SLURMD_PORT:-16818}
TIMEOUT=${SLURM_TIMEOUT:-$((120 + N))}
MIN_JOB_AGE=${SLURM_MIN_JOB_AGE:-86400}

die() { echo "bench/slurm.sh: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "run as root (slurmd launches jobs, munged needs its key)"
[[ "$N" =~ ^[1-9][0-9]*$ ]] || die "N must be a positive integer, got '$N'"
[[ "$SUBMITTERS" =~ ^[1-9][0-9]*$ ]] || die "SLURM_SUBMITTERS must be a positive integer"
[[ "$MIN_JOB_AGE" =~ ^[0-9]+$ ]] || die "SLURM_MIN_JOB_AGE must be a number of seconds"
case "$PROFILE" in tuned|default) ;; *) die "SLURM_PROFILE must be 'tuned' or 'default'" ;; esac
[ "$SUBMITTERS" -le "$N" ] || SUBMITTERS=$N

# --- install (idempotent) ---------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
   || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    echo "installing slurmctld slurmd slurm-client munge from Debian ..." >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >&2
fi

for p in "$CTLD_PORT" "$SLURMD_PORT"; do
    if ss -Hltn "sport = :$p" 2>/dev/null | grep -q .; then
        die "port $p is already in use (a leftover slurm? set SLURM_CTLD_PORT/SLURM_SLURMD_PORT)"
    fi
done

# --- private work dir and cleanup -------------------------------------------
WORK=$(mktemp -d /tmp/corral-slurm-bench.XXXXXX)
chmod 700 "$WORK"
# Every process this run starts (daemons, slurmstepd, jobs) inherits this
# marker, so cleanup can find exactly those processes by id, even the ones
# slurmd double-forks away from us.
MARK="CORRAL_SLURM_BENCH_MARK=$WORK"
MUNGED_PID='' CTLD_PID='' SLURMD_PID=''

alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
stop_pid() { # pid name: TERM, wait up to 10 s, then KILL
    local pid=$1 i
    alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 100); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then echo "  $2 ($pid) ignored SIGTERM; killing" >&2; kill -KILL "$pid" 2>/dev/null || true; fi
    wait "$pid" 2>/dev/null || true
}
marked_pids() { # our processes: those whose environment holds the marker
    local d pid
    for d in /proc/[0-9]*; do
        pid=${d#/proc/}
        if { tr '\0' '\n' <"$d/environ"; } 2>/dev/null | grep -qxF "$MARK"; then
            echo "$pid"
        fi
    done
}
stop_all() { # stop everything this run started, by pid
    local pids i
    if alive "$CTLD_PID"; then
        scancel --quiet --full --partition=bench 2>/dev/null
        for i in $(seq 50); do
            [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
    stop_pid "$SLURMD_PID" slurmd
    stop_pid "$CTLD_PID" slurmctld
    stop_pid "$MUNGED_PID" munged
    # shellcheck disable=SC2086 # word-split pid list
    for i in 1 2 3; do
        pids=$(marked_pids)
        [ -z "$pids" ] && break
        echo "  stopping leftover processes:" $pids >&2
        kill -KILL $pids 2>/dev/null
        sleep 0.2
    done
    wait 2>/dev/null
    CTLD_PID='' SLURMD_PID='' MUNGED_PID=''
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    stop_all
    if [ "$rc" -ne 0 ] && [ -n "${WORK:-}" ]; then
        for f in slurmctld.log slurmd.log munged.log munged.out; do
            [ -s "$WORK/$f" ] && { echo "--- tail $f" >&2; tail -n 15 "$WORK/$f" >&2; }
        done
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "$WORK/munge" "$WORK/state" "$WORK/spool/$(hostname -s)" "$WORK/ids"
chmod 700 "$WORK/munge"

# --- munge: private key, socket, pid, log and seed file ---------------------
KEY="$WORK/munge/munge.key"
if [ -r /etc/munge/munge.key ]; then
    cp /etc/munge/munge.key "$KEY"
else
    dd if=/dev/urandom of="$KEY" bs=1 count=1024 status=none
fi
chmod 400 "$KEY"
SOCK="$WORK/munge/munge.socket"
env "$MARK" munged --foreground --force --num-threads=10 --socket="$SOCK" --key-file="$KEY" \
    --pid-file="$WORK/munge/munged.pid" --log-file="$WORK/munged.log" \
    --seed-file="$WORK/munge/munged.seed" >"$WORK/munged.out" 2>&1 &
MUNGED_PID=$!
for _ in $(seq 100); do [ -S "$SOCK" ] && break; alive "$MUNGED_PID" || break; sleep 0.05; done
[ -S "$SOCK" ] || die "munged did not start"

# --- slurm.conf + cgroup.conf -----------------------------------------------
NODE=$(hostname -s)
if [ "$PROFILE" = tuned ]; then
    SCHED_PARAMS=${SLURM_SCHED_PARAMS:-sched_interval=1}
    SCHED_CONF="SchedulerType=sched/builtin
SchedulerParameters=$SCHED_PARAMS
PriorityType=priority/basic"
else
    SCHED_PARAMS="(none)"
    SCHED_CONF="SchedulerType=sched/backfill"
fi
MAX_JOBS=$((N + 1000)); [ "$MAX_JOBS" -ge 10000 ] || MAX_JOBS=10000
export SLURM_CONF="$WORK/slurm.conf"
cat >"$SLURM_CONF" <<EOF
ClusterName=corralbench
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCK
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool/%n
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmdPidFile=$WORK/slurmd.pid
SlurmctldLogFile=$WORK/slurmctld.log
SlurmdLogFile=$WORK/slurmd.log
SlurmctldDebug=error
SlurmdDebug=error
PlugStackConfig=$WORK/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SlurmdParameters=config_overrides
ReturnToService=2
MaxJobCount=$MAX_JOBS
MinJobAge=$MIN_JOB_AGE
$SCHED_CONF
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=16384 State=UNKNOWN
PartitionName=bench Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
# Nothing here uses cgroups (proctrack/linuxproc, task/none); keep slurmd off
# the cgroup hierarchy anyway.
cat >"$WORK/cgroup.conf" <<EOF
CgroupPlugin=cgroup/v1
CgroupAutomount=no
ConstrainCores=no
ConstrainRAMSpace=no
ConstrainDevices=no
EOF
: >"$WORK/plugstack.conf"

# --- daemons ----------------------------------------------------------------
env "$MARK" slurmctld -D -i -f "$SLURM_CONF" >"$WORK/slurmctld.out" 2>&1 &
CTLD_PID=$!
env "$MARK" slurmd -D -f "$SLURM_CONF" -N "$NODE" >"$WORK/slurmd.out" 2>&1 &
SLURMD_PID=$!

state=
for _ in $(seq 300); do # up to 30 s
    alive "$CTLD_PID" || die "slurmctld exited"
    alive "$SLURMD_PID" || die "slurmd exited"
    state=$(sinfo -h -N -n "$NODE" -o %t 2>/dev/null || true)
    [ "$state" = idle ] && break
    sleep 0.1
done
[ "$state" = idle ] || die "node $NODE not idle after 30 s (state '${state:-none}')"

# --- submit -----------------------------------------------------------------
echo "slurm $(slurmctld -V | awk '{print $2}'): profile=$PROFILE SchedulerParameters=$SCHED_PARAMS" \
     "CPUs=$CPUS N=$N submitters=$SUBMITTERS"
submitter() { # k count
    local i
    for ((i = 0; i < $2; i++)); do
        if ! env "$MARK" sbatch --parsable -o /dev/null -c 1 --mem=16M --wrap=/bin/true \
                >>"$WORK/ids/$1.ids" 2>>"$WORK/ids/$1.err"; then
            echo x >>"$WORK/ids/$1.fail"
        fi
    done
}
T0=$(date +%s.%N)
SUB_PIDS=()
for ((k = 0; k < SUBMITTERS; k++)); do
    submitter "$k" $(( N / SUBMITTERS + (k < N % SUBMITTERS ? 1 : 0) )) &
    SUB_PIDS+=($!)
done
for p in "${SUB_PIDS[@]}"; do wait "$p"; done
T_SUB=$(date +%s.%N)
ACCEPTED=$(cat "$WORK"/ids/*.ids 2>/dev/null | grep -c '^[0-9]' || true)
[ "$ACCEPTED" -eq "$N" ] || {
    cat "$WORK"/ids/*.err 2>/dev/null | sort | uniq -c | head >&2
    die "only $ACCEPTED of $N submissions accepted"
}

# --- wait until the queue is empty (bounded, with a stall check) ------------
left=$N last_left=-1 last_change=$(date +%s)
while :; do
    left=$(squeue -h -o %i 2>/dev/null | wc -l) || left=-1
    [ "$left" -eq 0 ] && break
    now=$(date +%s)
    [ "$left" -ne "$last_left" ] && { last_left=$left; last_change=$now; }
    (( now - ${T0%.*} <= TIMEOUT )) || die "timeout after ${TIMEOUT}s, $left jobs left"
    (( now - last_change <= 120 )) || die "no progress for 120 s, $left jobs left"
    if ! alive "$CTLD_PID" || ! alive "$SLURMD_PID"; then die "a slurm daemon died, $left jobs left"; fi
    sleep 0.2
done
T1=$(date +%s.%N)

# --- verify: every accepted job id is on record as COMPLETED ----------------
# (MinJobAge is large by default so no record is purged during the run; with a
# small SLURM_MIN_JOB_AGE the purged ones cannot be checked and are reported.)
squeue -h -t all -o '%i %T' >"$WORK/final" 2>/dev/null || die "squeue failed after the run"
read -r ok bad purged < <(awk 'FNR == NR { st[$1] = $2; next }
    /^[0-9]+$/ { if (!($1 in st)) p++; else if (st[$1] == "COMPLETED") o++; else b++ }
    END { print o + 0, b + 0, p + 0 }' "$WORK/final" "$WORK"/ids/*.ids)
[ "$bad" -eq 0 ] || die "$bad jobs did not end COMPLETED: $(awk '$2 != "COMPLETED" {print $2}' "$WORK/final" | sort | uniq -c | tr '\n' ' ')"
cycles=$(sdiag 2>/dev/null | awk '/^Main schedule statistics/ {m=1} m && /Total cycles:|Mean cycle:/ {gsub(/^[ \t]+/, ""); gsub(/[ \t]+/, " "); printf "%s; ", $0} /^Backfilling stats/ {m=0}')

stop_all
left_over=$(marked_pids | wc -l)
[ "$left_over" -eq 0 ] || die "$left_over processes left after stopping the daemons"
awk -v n="$N" -v t0="$T0" -v ts="$T_SUB" -v t1="$T1" 'BEGIN {
    printf "submitted %d jobs in %.2f s (%.1f submissions/s); all finished %.2f s after the first submit\n",
        n, ts - t0, n / (ts - t0), t1 - t0 }'
echo "verified: $ok of $N job ids COMPLETED, 0 failed, $purged already purged (MinJobAge=$MIN_JOB_AGE)"
[ -n "$cycles" ] && echo "sdiag main scheduler: $cycles"
awk -v n="$N" -v t0="$T0" -v t1="$T1" 'BEGIN { printf "slurm_jobs_per_second=%.2f\n", n / (t1 - t0) }'
