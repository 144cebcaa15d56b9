#!/usr/bin/env bash
# CI, after the unit tests: launchers/slurm.sbatch against a real Slurm on this one machine. Needs root on a
# Debian/Ubuntu machine; run from anywhere:
#
#   bash .ci/slurm.sh [WORK_DIR]      # default /tmp/ctcd-slurm (emptied first)
#
# Set-up (idempotent): installs munge, slurmctld, slurmd and slurm-client (Debian's slurm-wlm 22.05, built with
# --enable-multiple-slurmd) if missing; starts munged (unless one runs), a slurmctld and two slurmd on localhost:
# nodes n0 and n1 (NodeAddr 127.0.0.2 and 127.0.0.3, 2 CPUs each, the same two cores) in partition "ci", with a
# private slurm.conf (SLURM_CONF), state, spool and logs under WORK_DIR.
# Jobs (sbatch launchers/slurm.sbatch, the tests' tiny 6-step run):
#   one_node   1 node x 2 CPU ranks: finishes (exit 0) with its checkpoint (step 6) and TensorBoard logs
#   two_nodes  2 nodes x 1 rank, per-node starts by srun (NODE_RANK): both nodes joined, losses equal one_node's
#   preempted  2 nodes x 1 rank, 30 steps: `scancel --signal=USR1` after step 3
#              (what `#SBATCH --signal=USR1@T` sends before a time limit): the ranks checkpoint and exit 75, the
#              job requeues itself and resumes; then `scontrol requeue` (SIGTERM to every process, as preemption
#              with PreemptMode=REQUEUE): the ranks checkpoint, Slurm requeues, the third run resumes and finishes
# Exits non-zero on any failure. On exit: our jobs cancelled, slurmd/slurmctld stopped (munged too if started here).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-/tmp/ctcd-slurm}
case "$WORK" in /tmp/?* | /var/tmp/?* | "$HOME"/?*) ;; *)  # it is emptied first
  echo "error: WORK_DIR=$WORK: must be under /tmp, /var/tmp or \$HOME" >&2; exit 2 ;;
esac
CTLD_PORT=${CTLD_PORT:-6917}
NODE_PORTS=(6918 6919)
NODE_ADDRS=(127.0.0.2 127.0.0.3)
PY=$(command -v python3 || command -v python)
t_start=$SECONDS
say() { echo "[slurm $((SECONDS - t_start))s] $*"; }
. "$REPO/.ci/lib.sh"  # kill_leftover_ranks

# ------------------------------------------------------------------ packages
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null ||
  ! command -v munged >/dev/null; then
  say "installing munge, slurmctld, slurmd, slurm-client"
  t0=$SECONDS
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends munge slurmctld slurmd slurm-client >/dev/null
  say "apt-get update + install took $((SECONDS - t0)) s"
fi

# ------------------------------------------------------------------ clean-up (also of an earlier, interrupted run)
stop_pidfile() {
  local f=$1 pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; fi  # e.g. a slurmd still trying to reach slurmctld
  fi
  rm -f "$f"
}
stop_slurm() {
  local f
  for f in "$WORK"/run/slurmd-*.pid "$WORK/run/slurmctld.pid"; do stop_pidfile "$f"; done
}
cleanup() {
  local rc=$?
  set +e
  if [ -f "$WORK/run/slurmctld.pid" ]; then scancel --full --signal=KILL --user="$(id -un)" >/dev/null 2>&1; fi
  kill_leftover_ranks
  stop_slurm
  if [ -f "$WORK/run/munged.ours" ]; then stop_pidfile /run/munge/munged.pid; rm -f "$WORK/run/munged.ours"; fi
  if [ "$rc" != 0 ]; then
    for log in "$WORK"/log/*.log; do echo "== $log (last 15 lines)"; tail -n 15 "$log"; done
  fi
  say "exit $rc (total $((SECONDS - t_start)) s)"
  exit $rc
}
stop_slurm 2>/dev/null || true
trap cleanup EXIT
rm -rf "$WORK"
mkdir -p "$WORK"/{state,run,log,spool/n0,spool/n1}

# ------------------------------------------------------------------ munge, slurmctld, 2 x slurmd
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  if [ ! -s /etc/munge/munge.key ]; then mungekey --create --keyfile /etc/munge/munge.key; fi
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  runuser -u munge -- /usr/sbin/munged
  touch "$WORK/run/munged.ours"
  say "munged started"
fi
host=$(hostname -s)
export SLURM_CONF="$WORK/slurm.conf"
cat >"$SLURM_CONF" <<EOF
# written by .ci/slurm.sh: one machine, two slurmd (n0, n1) sharing its cores
ClusterName=ctcdci
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool/%n
SlurmctldPidFile=$WORK/run/slurmctld.pid
SlurmdPidFile=$WORK/run/slurmd-%n.pid
SlurmctldLogFile=$WORK/log/slurmctld.log
SlurmdLogFile=$WORK/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
# look at pending jobs every 2 s, not every 30-60 s: a requeued job starts as soon as it may
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=900
KillWait=30
# the job credential's lifetime, also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=cred_expire=10
NodeName=n0 NodeHostname=$host NodeAddr=${NODE_ADDRS[0]} Port=${NODE_PORTS[0]} CPUs=2 State=UNKNOWN
NodeName=n1 NodeHostname=$host NodeAddr=${NODE_ADDRS[1]} Port=${NODE_PORTS[1]} CPUs=2 State=UNKNOWN
PartitionName=ci Nodes=n0,n1 Default=YES MaxTime=INFINITE State=UP
EOF
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF" -N n0
slurmd -f "$SLURM_CONF" -N n1
for _ in $(seq 60); do
  [ "$(sinfo -h -p ci -t idle -o '%D' 2>/dev/null)" = 2 ] && break
  sleep 0.5
done
sinfo -N -l
[ "$(sinfo -h -p ci -t idle -o '%D')" = 2 ] || { say "FAILED: the 2 nodes did not become idle"; exit 1; }
say "Slurm up: slurmctld on port $CTLD_PORT, slurmd n0 and n1 ($(sinfo -V))"

# ------------------------------------------------------------------ jobs
cd "$REPO"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
say "training a 1000-piece tokenizer"
"$PY" -c "from ctcd_ds.assets import BUNDLED_TRAIN; from ctcd_ds.tokenizer import train_tokenizer
train_tokenizer(BUNDLED_TRAIN, '$WORK/tokenizer', vocab_size=1000, max_sentences=2000)" >"$WORK/tokenizer.log" 2>&1
tiny() {  # the tests' tiny run (tests/conftest.py tiny_overrides) into $WORK/$1
  echo "--output_dir=$WORK/$1" "--tokenizer.path=$WORK/tokenizer" --data.seq_len=64 --data.max_train_blocks=256 \
    --train.micro_batch_size=8 --train.steps=6 --train.log_every=1 --train.eval_every=3 --train.eval_batches=2 \
    --checkpoint.every=3 --checkpoint.keep_last=0 --export=false
}
job_field() { scontrol show job -o "$1" | tr ' ' '\n' | grep "^$2=" | cut -d= -f2-; }
submit_wait() {  # submit_wait NAME NODES NUM_GPUS ARGS...: sbatch, wait for the job; fail unless it completes with 0
  local name=$1 nodes=$2 gpus=$3 t0=$SECONDS id state
  shift 3
  say "sbatch $name: --nodes=$nodes NUM_GPUS=$gpus launchers/slurm.sbatch $*"
  id=$(sbatch --parsable --nodes="$nodes" --job-name="$name" --output="$WORK/$name.out" \
    --export="ALL,NUM_GPUS=$gpus" launchers/slurm.sbatch "$@")
  while :; do  # (sbatch --wait polls every 10-30 s)
    state=$(job_field "$id" JobState)
    case "$state" in PENDING | CONFIGURING | RUNNING | COMPLETING) ;; *) break ;; esac
    [ $((SECONDS - t0)) -lt 300 ] || { state="not done in 300 s ($state)"; break; }
    sleep 0.5
  done
  if [ "$state" != COMPLETED ] || [ "$(job_field "$id" ExitCode)" != 0:0 ]; then
    tail -n 60 "$WORK/$name.out"
    say "FAILED: job $name ($id): $state, exit $(job_field "$id" ExitCode) (output: $WORK/$name.out)"
    exit 1
  fi
  say "job $name ($id) took $((SECONDS - t0)) s: $state, exit $(job_field "$id" ExitCode)"
}
# shellcheck disable=SC2046  # tiny's words are meant to split
submit_wait one_node 1 2 $(tiny one_node)
# shellcheck disable=SC2046
submit_wait two_nodes 2 1 $(tiny two_nodes)

# preemption, twice in one job of 30 steps:
# 1. after step 3, `scancel --signal=USR1` (what `#SBATCH --signal=USR1@T` sends before the time limit): the ranks
#    checkpoint and exit 75, slurm.sbatch requeues the job itself;
# 2. after step 8 (the requeued run), `scontrol requeue` (what preemption with PreemptMode=REQUEUE does: SIGTERM to
#    every process, SIGKILL after KillWait, requeued by Slurm): the ranks checkpoint; the third run finishes.
# shellcheck disable=SC2046
job=$(sbatch --parsable --nodes=2 --job-name=preempted --output="$WORK/preempted.out" \
  --export="ALL,NUM_GPUS=1" launchers/slurm.sbatch $(tiny preempted) --train.steps=30 --train.eval_every=0 \
  --train.eval_batches=1 --checkpoint.every=1000)
say "sbatch preempted: job $job, 2 nodes x 1 rank, 30 steps"
t0=$SECONDS
steps_logged() {
  if [ -f "$WORK/preempted/metrics.jsonl" ]; then grep -c '}$' "$WORK/preempted/metrics.jsonl"; else echo 0; fi
}
wait_job() {  # wait_job DESCRIPTION CONDITION: poll until CONDITION (a function) holds; fail if the job ends first
  local state
  until "$2"; do
    state=$(job_field "$job" JobState)
    [ $((SECONDS - t0)) -lt 600 ] || { say "FAILED: job $job: no $1 within 600 s ($state)"; exit 1; }
    case "$state" in PENDING | RUNNING | CONFIGURING | REQUEUED | COMPLETING | REQUEUE_FED) ;; *)
      tail -n 40 "$WORK/preempted.out"; say "FAILED: job $job: $state before $1"; exit 1 ;;
    esac
    sleep 0.5
  done
}
at_step_3() { [ "$(steps_logged)" -ge 3 ]; }
restarted_at_step_8() { [ "$(job_field "$job" Restarts)" -ge 1 ] && [ "$(steps_logged)" -ge 8 ]; }
completed_after_2_restarts() {
  [ "$(job_field "$job" JobState)" = COMPLETED ] && [ "$(job_field "$job" Restarts)" -ge 2 ]
}
wait_job "step 3" at_step_3
scancel --signal=USR1 "$job"
say "scancel --signal=USR1 $job at step $(steps_logged)"
wait_job "restart with step 8" restarted_at_step_8
scontrol requeue "$job"
say "scontrol requeue $job at step $(steps_logged)"
wait_job "completion after 2 restarts" completed_after_2_restarts
say "job preempted ($job) took $((SECONDS - t0)) s: $(job_field "$job" JobState), restarts $(job_field "$job" Restarts)"

# ------------------------------------------------------------------ checks
check() { "$PY" tests/scripts/check_run.py "$@" || failed=1; }
failed=0
check finished "$WORK/one_node" 6
check world-size "$WORK/one_node" 2
check log-line "$WORK/one_node.out" "nnodes=1, num_local_procs=2, node_rank=0"
check finished "$WORK/two_nodes" 6
check world-size "$WORK/two_nodes" 2
check log-line "$WORK/two_nodes.out" "nnodes=2, num_local_procs=1, node_rank=0"
check log-line "$WORK/two_nodes.out" "nnodes=2, num_local_procs=1, node_rank=1"
check same-losses "$WORK/two_nodes" "$WORK/one_node"
check log-has "$WORK/preempted.out" "SIGUSR1 on rank" "stopped by SIGUSR1 at step" \
  "slurm.sbatch: stopped with a checkpoint (exit 75): requeueing job $job" "(restart 1)" \
  "CANCELLED AT" "DUE TO JOB REQUEUE" "stopped by SIGTERM at step" "(restart 2)"
resumed=$(grep -c "^resumed from $WORK/preempted/checkpoints/step_" "$WORK/preempted.out" || true)
if [ "$resumed" -ge 2 ]; then echo "ok: the preempted job resumed $resumed times"; else
  echo "FAILED: the preempted job resumed $resumed times, not 2" >&2; failed=1; fi
check finished "$WORK/preempted" 30
if [ "$failed" != 0 ]; then
  say "FAILED: see the lines above; job outputs and Slurm logs in $WORK"
  exit 1
fi
say "ok: launchers/slurm.sbatch on 1 node and on 2 nodes, preempted twice, requeued and resumed"
