#!/usr/bin/env bash
""":"
# ctcd-ds pre-training launcher. This file is valid bash AND valid Python:
#   bash launchers/pretrain.sh [KEY=VALUE ...] [--section.key=value ...]
#       builds and runs a `deepspeed` command that starts this same file with Python on every rank;
#   deepspeed [launcher flags] launchers/pretrain.sh [--section.key=value ...]
#       (what users type on clusters) runs the Python part below directly on every rank.
#
# Launcher settings (NUM_GPUS, NUM_NODES, HOSTFILE, NODE_RANK, LAUNCHER, MASTER_ADDR, MASTER_PORT, CTCD_CONFIG,
# DRY_RUN): see launchers/common.sh. Everything else passes through to `ctcd-ds pretrain` (see its --help).
LAUNCH_FILE="$0"
. "$(dirname "$0")/common.sh"
":"""

# Python part: the deepspeed launcher runs this on every rank.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # works from a checkout without pip install
from ctcd_ds.cli import launched  # noqa: E402

sys.exit(launched("pretrain", sys.argv[1:]))
