# Shared bash part of the launchers (sourced, never run): parse launcher settings, build the deepspeed
# command that runs $LAUNCH_FILE with Python on every rank, and run it (or print it with DRY_RUN=1).
# Settings, from the environment or as leading KEY=VALUE arguments:
#   NUM_GPUS     ranks per node (default: the hostfile's slots, else the GPUs nvidia-smi lists, else 1 CPU rank)
#   NUM_NODES    nodes (default: the hosts listed in HOSTFILE, else 1)
#   HOSTFILE     a DeepSpeed hostfile ("host slots=N" per line) for multi-node runs
#   MASTER_ADDR  address of rank 0 (multi-node)
#   MASTER_PORT  rendezvous port (default 29500)
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
if [ -z "${NUM_GPUS:-}" ] && [ -z "${HOSTFILE:-}" ]; then  # with a hostfile, its slots= decide
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NUM_GPUS=$(nvidia-smi -L | grep -c GPU)
  else
    NUM_GPUS=1
  fi
fi
cmd=(deepspeed)
if [ -n "${HOSTFILE:-}" ]; then
  if [ ! -f "$HOSTFILE" ]; then echo "error: HOSTFILE=$HOSTFILE: no such file" >&2; exit 2; fi
  NUM_NODES=${NUM_NODES:-$(grep -c "slots=" "$HOSTFILE")}
  cmd+=(--hostfile "$HOSTFILE" --num_nodes "$NUM_NODES")
elif [ -n "${NUM_NODES:-}" ] && [ "$NUM_NODES" != 1 ]; then
  echo "error: NUM_NODES=$NUM_NODES needs HOSTFILE (a DeepSpeed hostfile listing the nodes)" >&2; exit 2
fi
if [ -n "${NUM_GPUS:-}" ]; then cmd+=(--num_gpus "$NUM_GPUS"); fi
cmd+=(--master_port "${MASTER_PORT:-29500}")
if [ -n "${MASTER_ADDR:-}" ]; then cmd+=(--master_addr "$MASTER_ADDR"); fi
cmd+=("$LAUNCH_FILE")
if [ -n "${CTCD_CONFIG:-}" ]; then cmd+=(--config "$CTCD_CONFIG"); fi
cmd+=(${passthrough[@]+"${passthrough[@]}"})
if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
