# Shared bash part of the launchers (sourced, never run): parse launcher settings, build the deepspeed
# command that runs $LAUNCH_FILE with Python on every rank, and run it (or print it with DRY_RUN=1).
# Settings, from the environment or as leading KEY=VALUE arguments:
#   NUM_GPUS     ranks per node (default: the hostfile's slots, else the GPUs nvidia-smi lists, else 1 CPU rank)
#   NUM_NODES    nodes (default: the hosts listed in HOSTFILE, else 1)
#   HOSTFILE     a DeepSpeed hostfile ("host slots=N" per line): started on the first node, DeepSpeed starts
#                the others (pdsh over ssh, or LAUNCHER)
#   NODE_RANK    this node's rank, 0 to NUM_NODES-1, when every node is started on its own (srun, Kubernetes):
#                deepspeed --no_ssh --node_rank; needs NUM_NODES (or HOSTFILE) and MASTER_ADDR
#   LAUNCHER     DeepSpeed's multi-node backend with HOSTFILE: pdsh (default), openmpi, mvapich, mpich, impi, slurm
#   MASTER_ADDR  address of rank 0, i.e. of node 0 (multi-node)
#   MASTER_PORT  rendezvous port (default: a port free on this machine, so runs on one box do not collide;
#                on several nodes, 29500: every node must use the same port, and rank 0 may be another machine)
#   CTCD_CONFIG  a recipe name or YAML file (--config); as an argument also CONFIG=... (a bare CONFIG
#                variable in the environment is never read: it is too common a name)
#   DRY_RUN=1    print the deepspeed command instead of running it
set -euo pipefail
passthrough=()
for arg in "$@"; do
  case "$arg" in
    NUM_GPUS=*|NUM_NODES=*|HOSTFILE=*|NODE_RANK=*|LAUNCHER=*|MASTER_ADDR=*|MASTER_PORT=*|CTCD_CONFIG=*|DRY_RUN=*)
      export "$arg" ;;
    CONFIG=*) export CTCD_CONFIG="${arg#CONFIG=}" ;;
    *) passthrough+=("$arg") ;;
  esac
done
fail() { echo "error: $*" >&2; exit 2; }
# A count: digits, not all zeros (08 is 8, as DeepSpeed reads it).
check_count() { [[ $2 =~ ^[0-9]+$ && $2 =~ [1-9] ]] || fail "$1=$2: must be a positive integer"; }
if [ -n "${NUM_GPUS:-}" ]; then check_count NUM_GPUS "$NUM_GPUS"; fi
if [ -n "${NUM_NODES:-}" ]; then check_count NUM_NODES "$NUM_NODES"; fi
if [ -n "${MASTER_PORT:-}" ] && ! [[ $MASTER_PORT =~ ^[1-9][0-9]{0,4}$ && $MASTER_PORT -le 65535 ]]; then
  fail "MASTER_PORT=$MASTER_PORT: must be a port number (1-65535)"
fi
# bind_port PORT: bind a TCP port on every IPv4 address of this machine (which a dual-stack IPv6 listener also
# holds); prints it (for 0: one the kernel finds free). Status 3: the port is in use. Anything else (no python,
# a privileged port) tells nothing. SO_REUSEADDR, as torch's rendezvous store binds: connections lingering in
# TIME_WAIT do not count as in use.
bind_port() {
  "$(command -v python3 || command -v python)" -c '
import errno, socket, sys
port = int(sys.argv[1])
s = socket.socket()
if port:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("", port))
except OSError as exc:
    sys.exit(3 if exc.errno == errno.EADDRINUSE else 0)
print(s.getsockname()[1])' "$1"
}
if [ -n "${NODE_RANK:-}" ] && ! [[ $NODE_RANK =~ ^[0-9]+$ ]]; then
  fail "NODE_RANK=$NODE_RANK: must be a node number (0 for the node of rank 0)"
fi
if [ -n "${LAUNCHER:-}" ]; then
  case "$LAUNCHER" in pdsh|openmpi|mvapich|mpich|impi|slurm) ;; *)
    fail "LAUNCHER=$LAUNCHER: not one of DeepSpeed's multi-node launchers (pdsh, openmpi, mvapich, mpich, impi, slurm)" ;;
  esac
  if [ -z "${HOSTFILE:-}" ] || [ -n "${NODE_RANK:-}" ]; then
    fail "LAUNCHER=$LAUNCHER: starts the nodes from a HOSTFILE; with NODE_RANK every node is started on its own"
  fi
fi
if [ -z "${NUM_GPUS:-}" ] && [ -z "${HOSTFILE:-}" ]; then  # with a hostfile, its slots= decide
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NUM_GPUS=$(nvidia-smi -L | grep -c GPU)
  else
    NUM_GPUS=1
  fi
fi
cmd=(deepspeed)
if [ -n "${HOSTFILE:-}" ]; then
  if [ ! -f "$HOSTFILE" ]; then fail "HOSTFILE=$HOSTFILE: no such file"; fi
  hosts=$(grep -c '^[^#]*slots=' "$HOSTFILE" || true)  # DeepSpeed skips lines starting with #
  if [ "$hosts" = 0 ]; then fail "HOSTFILE=$HOSTFILE: lists no hosts (one 'HOST slots=N' line per node)"; fi
  NUM_NODES=${NUM_NODES:-$hosts}
  cmd+=(--hostfile "$HOSTFILE" --num_nodes "$NUM_NODES")
elif [ -n "${NODE_RANK:-}" ] && [ -n "${NUM_NODES:-}" ] && [ $((10#$NUM_NODES)) -gt 1 ]; then
  # DeepSpeed's runner counts the nodes, and the ranks of each, only from a hostfile (without one it is a
  # single-node run on 127.0.0.1); with --no_ssh it reads nothing else from it. Write one: NUM_GPUS slots per node.
  HOSTFILE="${TMPDIR:-/tmp}/ctcd_ds-$(id -u)-nodes-${NUM_NODES}x${NUM_GPUS}.hostfile"
  tmp_hostfile=$(mktemp "$HOSTFILE.XXXXXX")
  for ((i = 0; i < 10#$NUM_NODES; i++)); do echo "node$i slots=$NUM_GPUS"; done >"$tmp_hostfile"
  mv -f "$tmp_hostfile" "$HOSTFILE"
  cmd+=(--hostfile "$HOSTFILE" --num_nodes "$NUM_NODES")
elif [ -n "${NODE_RANK:-}" ] && [ -z "${NUM_NODES:-}" ]; then
  fail "NODE_RANK=$NODE_RANK needs NUM_NODES (how many nodes the run has, the same on every node) or a HOSTFILE"
elif [ -n "${NUM_NODES:-}" ] && [ $((10#$NUM_NODES)) -gt 1 ]; then
  fail "NUM_NODES=$NUM_NODES needs HOSTFILE (a DeepSpeed hostfile listing the nodes, started from the first) or" \
    "NODE_RANK (this node's rank, when every node is started on its own)"
fi
if [ -n "${NUM_GPUS:-}" ]; then cmd+=(--num_gpus "$NUM_GPUS"); fi
several=$([ -n "${NUM_NODES:-}" ] && [ $((10#$NUM_NODES)) -gt 1 ] && echo 1 || echo 0)
if [ -n "${NODE_RANK:-}" ]; then
  if [ $((10#$NODE_RANK)) -ge $((10#${NUM_NODES:-1})) ]; then
    fail "NODE_RANK=$NODE_RANK: must be below NUM_NODES=${NUM_NODES:-1} (nodes count from 0)"
  fi
  if [ "$several" = 1 ]; then
    if [ -z "${MASTER_ADDR:-}" ]; then
      fail "NODE_RANK=$NODE_RANK: a per-node start needs MASTER_ADDR (the address of node 0, the same on every node)"
    fi
    cmd+=(--no_ssh --node_rank "$NODE_RANK")
  fi
fi
if [ -n "${LAUNCHER:-}" ]; then cmd+=(--launcher "$LAUNCHER"); fi
if [ -n "${HOSTFILE:-}" ] && [ -z "${NODE_RANK:-}" ]; then
  # started on the first node, which DeepSpeed makes node 0: the same port on every node; not probed (rank 0 may be
  # another machine)
  MASTER_PORT=${MASTER_PORT:-29500}
elif [ "$several" = 1 ]; then  # a per-node start: every node must use the same port; node 0 (rank 0) binds it
  port_source="MASTER_PORT=${MASTER_PORT:-29500}"
  if [ -z "${MASTER_PORT:-}" ]; then port_source="MASTER_PORT=29500 (the default on several nodes)"; fi
  MASTER_PORT=${MASTER_PORT:-29500}
  if [ $((10#$NODE_RANK)) = 0 ] && { bind_port "$MASTER_PORT" >/dev/null 2>&1; [ $? = 3 ]; }; then
    fail "$port_source: in use on this machine, node 0; set MASTER_PORT to a free port, the same on every node"
  fi
elif [ -z "${MASTER_PORT:-}" ]; then  # the port is free now; a run starting in the same instant could still take it
  MASTER_PORT=$(bind_port 0 2>/dev/null || true)
  MASTER_PORT=${MASTER_PORT:-29500}
elif { bind_port "$MASTER_PORT" >/dev/null 2>&1; [ $? = 3 ]; }; then  # single node: rank 0 binds it here
  fail "MASTER_PORT=$MASTER_PORT: in use on this machine; choose another or leave MASTER_PORT unset"
fi
cmd+=(--master_port "$MASTER_PORT")
if [ -n "${MASTER_ADDR:-}" ]; then cmd+=(--master_addr "$MASTER_ADDR"); fi
cmd+=("$LAUNCH_FILE")
if [ -n "${CTCD_CONFIG:-}" ]; then cmd+=(--config "$CTCD_CONFIG"); fi
cmd+=(${passthrough[@]+"${passthrough[@]}"})
if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
