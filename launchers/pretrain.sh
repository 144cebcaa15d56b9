#!/usr/bin/env bash
""":"
# ctcd-ds pre-training launcher. This file is valid bash AND valid Python:
#   bash launchers/pretrain.sh [KEY=VALUE ...] [--section.key=value ...]
#       builds and runs a `deepspeed` command that starts this same file with Python on every rank;
#   deepspeed [launcher flags] launchers/pretrain.sh [--section.key=value ...]
#       (what users type on clusters) runs the Python part below directly on every rank.
#
# Launcher settings, from the environment or as leading KEY=VALUE arguments:
#   NUM_GPUS     ranks per node (default: the hostfile's slots, else the GPUs nvidia-smi lists, else 1 CPU rank)
#   NUM_NODES    nodes (default: the hosts listed in HOSTFILE, else 1)
#   HOSTFILE     a DeepSpeed hostfile ("host slots=N" per line) for multi-node runs
#   MASTER_ADDR  address of rank 0 (multi-node)
#   MASTER_PORT  rendezvous port (default 29500)
#   CONFIG       a recipe name or YAML file (ctcd-ds pretrain --config)
#   DRY_RUN=1    print the deepspeed command instead of running it
# Everything else passes through to `ctcd-ds pretrain` (see `ctcd-ds pretrain --help`).
set -euo pipefail
passthrough=()
for arg in "$@"; do
  case "$arg" in
    NUM_GPUS=*|NUM_NODES=*|HOSTFILE=*|MASTER_ADDR=*|MASTER_PORT=*|CONFIG=*|DRY_RUN=*) export "$arg" ;;
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
cmd+=("$0")
if [ -n "${CONFIG:-}" ]; then cmd+=(--config "$CONFIG"); fi
cmd+=(${passthrough[@]+"${passthrough[@]}"})
if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
":"""

# Python part: the deepspeed launcher runs this on every rank.
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # works from a checkout without pip install
from ctcd_ds.cli import main  # noqa: E402

args = sys.argv[1:]
config = [a.split("=", 1)[1] for a in args if a.startswith("CONFIG=")]
args = [a for a in args if not a.startswith("CONFIG=")]
if "--config" not in args and not any(a.startswith("--config=") for a in args):
    config = config or ([os.environ["CONFIG"]] if os.environ.get("CONFIG") else [])
    args = [f"--config={c}" for c in config[-1:]] + args
sys.exit(main(["pretrain", *args]))
