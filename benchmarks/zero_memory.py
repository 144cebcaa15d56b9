"""Per-rank memory of a co-training pair under ZeRO stages 0-3, against what ZeRO promises.

Runs `bash launchers/scale.sh` (one short run per stage, every member a ZeRO engine of that stage) and reads its
scaling.csv. "Engine memory" is a rank's peak memory minus its memory just before the engines were built (after
imports and data loading): the members' weights, gradients and Adam states, plus activations and DeepSpeed's
buffers. The theory column is the textbook ZeRO count for fp32 training with Adam on N ranks, per parameter:
weights 4 B, gradients 4 B, Adam moments 8 B; stage 1 partitions the moments, stage 2 also the gradients, stage 3
also the weights: 16, 8 + 8/N, 4 + 12/N, 16/N bytes, as fractions of stage 0.

    python benchmarks/zero_memory.py [--recipe ctcd_large] [--ranks 2] [--out runs/zero-memory] [--vocab 8192]
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def theory(stage: int, n: int) -> float:
    bytes_per_param = {0: 16, 1: 8 + 8 / n, 2: 4 + 12 / n, 3: 16 / n}[stage]
    return bytes_per_param / 16


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="ctcd_large")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--templates", nargs="+", default=["zero0", "zero1", "zero2", "zero3"])
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192, help="tokenizer.vocab_size (the bundled corpus trains ~8K)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--out", default="runs/zero-memory")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per stage")
    args = p.parse_args()
    overrides = [f"--tokenizer.vocab_size={args.vocab}", "--data.max_train_blocks=64"]
    cmd = [
        "bash", str(REPO / "launchers" / "scale.sh"), f"--output_dir={args.out}", f"--recipes=[{args.recipe}]",
        f"--ranks=[{args.ranks}]", f"--templates=[{','.join(args.templates)}]", f"--micro_batch=[{args.micro_batch}]",
        f"--seq_len=[{args.seq_len}]", f"--steps={args.steps}", "--warmup_steps=1", "--precision=[fp32]",
        f"--timeout_s={args.timeout}", f"--overrides={json.dumps(overrides)}",
    ]  # fmt: skip
    print("$", " ".join(cmd), flush=True)
    if subprocess.run(cmd, cwd=REPO).returncode != 0:
        return 1
    with open(Path(args.out) / "scaling.csv") as f:
        rows = {int(r["zero_stage"]): r for r in csv.DictReader(f)}
    base = rows.get(0)
    print(f"\n{args.recipe} on {args.ranks} ranks, fp32, micro-batch {args.micro_batch} x {args.seq_len} tokens")
    if base and base["status"] == "ok":
        print(f"parameters: {base['members_params']} ({int(base['parameters']) / 1e6:.0f}M together)")
    print(f"{'stage':>5} {'peak GB (max rank)':>18} {'engine GB':>10} {'of ZeRO-0':>10} {'theory':>7}  s/step")
    for stage, r in sorted(rows.items()):
        if r["status"] != "ok":
            print(f"{stage:>5}  failed: {r['error']}")
            continue
        engine = float(r["engine_memory_gb_max"])
        share = engine / float(base["engine_memory_gb_max"]) if base and base["status"] == "ok" else float("nan")
        print(
            f"{stage:>5} {float(r['peak_memory_gb_max']):>18.2f} {engine:>10.2f} {share:>10.0%} "
            f"{theory(stage, args.ranks):>7.0%}  {float(r['step_time_median_s']):.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
