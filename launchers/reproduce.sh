#!/usr/bin/env bash
""":"
# The CTCD reproduction experiment (ctcd-ds experiment); valid bash AND Python like pretrain.sh:
#   bash launchers/reproduce.sh [--quick=true] [--scale=paper] [--section.key=value ...]
#   deepspeed [launcher flags] launchers/reproduce.sh [...]
# Launcher settings (NUM_GPUS, HOSTFILE, ...): see launchers/common.sh; `ctcd-ds experiment --help` lists the rest.
LAUNCH_FILE="$0"
. "$(dirname "$0")/common.sh"
":"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ctcd_ds.cli import launched  # noqa: E402

sys.exit(launched("experiment", sys.argv[1:]))
