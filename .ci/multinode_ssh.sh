#!/usr/bin/env bash
# CI, after the unit tests: a real 2-node x 1-rank co-training through DeepSpeed's default multi-node runner
# (hostfile + pdsh over ssh) on this one machine, the two "nodes" being the loopback aliases 127.0.0.2 and
# 127.0.0.3. Needs root (apt-get, sshd) on a Debian/Ubuntu machine; run from anywhere:
#
#   bash .ci/multinode_ssh.sh [WORK_DIR]      # default /tmp/ctcd-multinode-ssh (emptied first)
#
# Set-up (idempotent): installs openssh-server and pdsh if missing, starts a private sshd listening only on
# 127.0.0.2/127.0.0.3:$SSH_PORT with its own host key and authorized_keys, a passwordless client key, and a
# marked block at the top of ~/.ssh/config (port, key, no host-key prompts) for those two addresses.
# Runs:   two_nodes  HOSTFILE (2 hosts, slots=1) bash launchers/pretrain.sh     6 steps, checkpoints at 3 and 6
#         one_node   NUM_GPUS=2 bash launchers/pretrain.sh                       the same config on 1 node x 2 ranks
#         resumed    1 node x 2 ranks, --checkpoint.resume=two_nodes' step 3     steps 4..6
# Checks: both nodes joined (each node's DeepSpeed launcher reports nnodes=2 and its node_rank, world size 2; the
#         checkpoints were written by 2 ranks), the per-step losses of two_nodes equal one_node's, the resumed
#         run's steps 4..6 equal one_node's. Exits non-zero on any failure. On exit: sshd stopped, the
#         ~/.ssh/config block removed, leftover ranks of these runs killed; the packages stay installed.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-/tmp/ctcd-multinode-ssh}
case "$WORK" in /tmp/?* | /var/tmp/?* | "$HOME"/?*) ;; *)  # it is emptied first
  echo "error: WORK_DIR=$WORK: must be under /tmp, /var/tmp or \$HOME" >&2; exit 2 ;;
esac
SSH_PORT=${SSH_PORT:-2222}
NODES=(127.0.0.2 127.0.0.3)
PY=$(command -v python3 || command -v python)
MARK_BEGIN="# >>> ctcd-ds .ci/multinode_ssh.sh >>>"
MARK_END="# <<< ctcd-ds .ci/multinode_ssh.sh <<<"
t_start=$SECONDS
say() { echo "[multinode_ssh $((SECONDS - t_start))s] $*"; }
. "$REPO/.ci/lib.sh"  # kill_leftover_ranks

# ------------------------------------------------------------------ packages
if [ ! -x /usr/sbin/sshd ] || ! command -v pdsh >/dev/null; then
  say "installing openssh-server, openssh-client, pdsh"
  t0=$SECONDS
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends openssh-server openssh-client pdsh >/dev/null
  say "apt-get update + install took $((SECONDS - t0)) s"
fi

# ------------------------------------------------------------------ clean-up (also of an earlier, interrupted run)
remove_ssh_config_block() {
  [ -f ~/.ssh/config ] || return 0
  awk -v b="$MARK_BEGIN" -v e="$MARK_END" '$0 == b {skip = 1} !skip {print} $0 == e {skip = 0}' ~/.ssh/config \
    >~/.ssh/config.ctcd.tmp && mv ~/.ssh/config.ctcd.tmp ~/.ssh/config
}
stop_sshd() {
  local pid
  if [ -f "$WORK/sshd/sshd.pid" ]; then
    pid=$(cat "$WORK/sshd/sshd.pid")
    if kill -0 "$pid" 2>/dev/null; then kill "$pid"; fi
    rm -f "$WORK/sshd/sshd.pid"
  fi
}
cleanup() {
  local rc=$?
  set +e
  kill_leftover_ranks
  stop_sshd
  remove_ssh_config_block
  if [ -f "$WORK/ssh/config.ours" ] && ! grep -q "[^[:space:]]" ~/.ssh/config; then rm -f ~/.ssh/config; fi
  if [ -f "$WORK/ssh/dir.ours" ]; then rmdir ~/.ssh 2>/dev/null; fi
  say "exit $rc (total $((SECONDS - t_start)) s)"
  exit $rc
}
stop_sshd 2>/dev/null || true
trap cleanup EXIT
rm -rf "$WORK"
mkdir -p "$WORK/sshd" "$WORK/ssh"
chmod 700 "$WORK/ssh"

# ------------------------------------------------------------------ sshd on the loopback aliases
ssh-keygen -q -t ed25519 -N '' -f "$WORK/sshd/host_key"
ssh-keygen -q -t ed25519 -N '' -f "$WORK/ssh/id_ed25519"
cp "$WORK/ssh/id_ed25519.pub" "$WORK/ssh/authorized_keys"
{
  echo "Port $SSH_PORT"
  for node in "${NODES[@]}"; do echo "ListenAddress $node"; done
  echo "HostKey $WORK/sshd/host_key"
  echo "PidFile $WORK/sshd/sshd.pid"
  echo "AuthorizedKeysFile $WORK/ssh/authorized_keys"
  echo "StrictModes no"  # the key file lies under /tmp (world-writable)
  echo "PermitRootLogin prohibit-password"
  echo "PasswordAuthentication no"
  echo "KbdInteractiveAuthentication no"
  echo "UsePAM no"
  echo "MaxStartups 100"  # pdsh opens its sessions at once
} >"$WORK/sshd/sshd_config"
mkdir -p /run/sshd  # sshd's privilege separation directory (the package's service would create it)
/usr/sbin/sshd -f "$WORK/sshd/sshd_config" -E "$WORK/sshd/sshd.log"
say "sshd started on ${NODES[*]} port $SSH_PORT (pid $(cat "$WORK/sshd/sshd.pid"))"

if [ ! -e ~/.ssh ]; then touch "$WORK/ssh/dir.ours"; fi  # none before: remove them on exit
if [ ! -e ~/.ssh/config ]; then touch "$WORK/ssh/config.ours"; fi
mkdir -p ~/.ssh && chmod 700 ~/.ssh && touch ~/.ssh/config
remove_ssh_config_block
block="$MARK_BEGIN
Host ${NODES[*]}
  Port $SSH_PORT
  IdentityFile $WORK/ssh/id_ed25519
  IdentitiesOnly yes
  BatchMode yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
$MARK_END"
# first match wins in ssh_config: the block goes first, above any Host * the file has
printf '%s\n%s\n' "$block" "$(cat ~/.ssh/config)" >~/.ssh/config.ctcd.tmp && mv ~/.ssh/config.ctcd.tmp ~/.ssh/config
chmod 600 ~/.ssh/config
for node in "${NODES[@]}"; do
  ssh "$node" true || { cat "$WORK/sshd/sshd.log"; say "FAILED: ssh $node true"; exit 1; }
done
say "passwordless ssh to ${NODES[*]} works"

# ------------------------------------------------------------------ what the remote side gets
# DeepSpeed's pdsh runner runs, on each node, `export <vars>; cd <this dir>; <this python> -u -m
# deepspeed.launcher.launch ... --node_rank=%n`; the exported vars are those starting with PYTHON/MLFLOW/MV2/UCX
# (PYTHONPATH gets the current dir) and the lines of the DeepSpeed env file (~/.deepspeed_env or ./.deepspeed_env,
# or DS_ENV_FILE). Nothing else of this shell reaches the ranks: an ssh session starts from a clean environment.
export DS_ENV_FILE="$WORK/deepspeed_env"  # an absolute name: os.path.join(~, "/abs") is "/abs"
cat >"$DS_ENV_FILE" <<EOF
PATH=$PATH
OMP_NUM_THREADS=1
HF_HUB_OFFLINE=1
HF_DATASETS_OFFLINE=1
TOKENIZERS_PARALLELISM=false
EOF
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
for node in "${NODES[@]}"; do echo "$node slots=1"; done >"$WORK/hostfile"

# ------------------------------------------------------------------ runs
cd "$REPO"
say "training a 1000-piece tokenizer"
"$PY" -c "from ctcd_ds.assets import BUNDLED_TRAIN; from ctcd_ds.tokenizer import train_tokenizer
train_tokenizer(BUNDLED_TRAIN, '$WORK/tokenizer', vocab_size=1000, max_sentences=2000)" >"$WORK/tokenizer.log" 2>&1
tiny() {  # the tests' tiny run (tests/conftest.py tiny_overrides) into $WORK/$1
  echo "--output_dir=$WORK/$1" "--tokenizer.path=$WORK/tokenizer" --data.seq_len=64 --data.max_train_blocks=256 \
    --train.micro_batch_size=8 --train.steps=6 --train.log_every=1 --train.eval_every=3 --train.eval_batches=2 \
    --checkpoint.every=3 --checkpoint.keep_last=0 --export=false
}
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }
run() {  # run NAME LAUNCHER-ARGS...: the launcher, its output in $WORK/NAME.log, at most 5 minutes
  local name=$1 t0=$SECONDS rc=0
  shift
  say "run $name: bash launchers/pretrain.sh $*"
  timeout -k 10 300 bash launchers/pretrain.sh "$@" >"$WORK/$name.log" 2>&1 || rc=$?
  if [ "$rc" != 0 ]; then
    tail -n 60 "$WORK/$name.log"
    say "FAILED: run $name exited with $rc (log: $WORK/$name.log)"
    exit 1
  fi
  say "run $name took $((SECONDS - t0)) s"
}
# shellcheck disable=SC2046  # tiny's words are meant to split
HOSTFILE="$WORK/hostfile" MASTER_ADDR=${NODES[0]} MASTER_PORT=$(free_port) run two_nodes $(tiny two_nodes)
# shellcheck disable=SC2046
NUM_GPUS=2 run one_node $(tiny one_node)
# shellcheck disable=SC2046
NUM_GPUS=2 run resumed $(tiny resumed) "--checkpoint.resume=$WORK/two_nodes/checkpoints/step_00000003"

# ------------------------------------------------------------------ checks
check() { "$PY" tests/scripts/check_run.py "$@" || failed=1; }
failed=0
# pdsh prefixes every line of a node with "HOST: "; each node's launcher starts its own rank
check log-has "$WORK/two_nodes.log" "Running on the following workers: ${NODES[0]},${NODES[1]}"
check log-line "$WORK/two_nodes.log" "${NODES[0]}: " "nnodes=2, num_local_procs=1, node_rank=0"
check log-line "$WORK/two_nodes.log" "${NODES[1]}: " "nnodes=2, num_local_procs=1, node_rank=1"
check log-line "$WORK/two_nodes.log" "${NODES[1]}: " "dist_world_size=2"
check world-size "$WORK/two_nodes" 2
check finished "$WORK/two_nodes" 6
check same-losses "$WORK/two_nodes" "$WORK/one_node"
check log-has "$WORK/resumed.log" "resumed from $WORK/two_nodes/checkpoints/step_00000003 at step 3"
check world-size "$WORK/resumed" 2
check finished "$WORK/resumed" 6
check same-losses "$WORK/resumed" "$WORK/one_node" 4
if [ "$failed" != 0 ]; then
  say "FAILED: see the lines above; logs in $WORK"
  exit 1
fi
say "ok: 2 nodes x 1 rank over pdsh/ssh = 1 node x 2 ranks, and its checkpoint resumes on 1 node"
