# Shared bash part of the launchers (sourced, never run): parse launcher settings, build the deepspeed
# command that runs $LAUNCH_FILE with Python on every rank, and run it (or print it with DRY_RUN=1).
# Settings, from the environment or as leading KEY=VALUE arguments:
#   NUM_GPUS     ranks per node (default: the hostfile's slots, else the GPUs nvidia-smi lists, else 1 CPU rank)
#   NUM_NODES    nodes (default: the hosts listed in HOSTFILE, else 1)
#   HOSTFILE     a DeepSpeed hostfile ("host slots=N" per line) for multi-node runs
#   MASTER_ADDR  address of rank 0 (multi-node)
#   MASTER_PORT  rendezvous port (default: a port free on this machine, so runs on one box do not collide;
#                with HOSTFILE, 29500: every node uses the same port, and rank 0 may be another machine)
#   CTCD_CONFIG  a recipe name or YAML file (--config); as an argument also CONFIG=... (a bare CONFIG
#                variable in the environment is never read: it is too common a name)
#   DRY_RUN=1    print the deepspeed command instead of running it
set -euo pipefail
passthrough=()
for arg in "$@"; do
  case "$arg" in
    NUM_GPUS=*|NUM_NODES=*|HOSTFILE=*|MASTER_ADDR=*|MASTER_PORT=*|CTCD_CONFIG=*|DRY_RUN=*) export "$arg" ;;
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
elif [ -n "${NUM_NODES:-}" ] && [ "$NUM_NODES" != 1 ]; then
  fail "NUM_NODES=$NUM_NODES needs HOSTFILE (a DeepSpeed hostfile listing the nodes)"
fi
if [ -n "${NUM_GPUS:-}" ]; then cmd+=(--num_gpus "$NUM_GPUS"); fi
if [ -n "${HOSTFILE:-}" ]; then  # multi-node: the same port on every node; not probed (rank 0 may be elsewhere)
  MASTER_PORT=${MASTER_PORT:-29500}
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
