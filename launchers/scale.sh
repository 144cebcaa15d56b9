#!/usr/bin/env bash
""":"
# ctcd-ds scaling experiments. This file is valid bash AND valid Python:
#   bash launchers/scale.sh [KEY=VALUE ...] [--key=value ...]
# runs `ctcd-ds scale` (see its --help and docs/scaling.md) on ONE process: it starts every point of the grid
# itself through launchers/pretrain.sh, the way a user would. Launcher-style settings, from the environment or as
# leading KEY=VALUE arguments:
#   HOSTFILE   a DeepSpeed hostfile for multi-node points (--hostfile)
#   DRY_RUN=1  print each point's launcher command instead of running it (--dry_run=true)
set -euo pipefail
args=()
for arg in "$@"; do
  case "$arg" in
    HOSTFILE=*|DRY_RUN=*) export "$arg" ;;
    *) args+=("$arg") ;;
  esac
done
if [ -n "${HOSTFILE:-}" ]; then args=("--hostfile=$HOSTFILE" ${args[@]+"${args[@]}"}); fi
if [ "${DRY_RUN:-0}" = 1 ]; then args+=("--dry_run=true"); fi
exec "$(command -v python3 || command -v python)" "$0" ${args[@]+"${args[@]}"}
":"""

# Python part
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # works from a checkout without pip install
from ctcd_ds.cli import main  # noqa: E402

sys.exit(main(["scale", *sys.argv[1:]]))
