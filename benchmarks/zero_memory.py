"""Per-rank memory of a co-training pair under ZeRO stages 0-3, against what ZeRO promises.

Runs `bash launchers/scale.sh` (one short run per stage, every member a ZeRO engine of that stage) and reads its
scaling.csv. Two measures per rank (the larger rank's is shown): "tensors", the bytes of every tensor the rank holds
after its last step (weights, optimizer states, gradient buffers, the data: the state ZeRO partitions, without
allocator slack); and "engines", its peak resident memory minus its memory just before the engines were built (after
imports and data loading): also transient peaks (DeepSpeed's set-up copies, activations, buffers) and what the
allocator keeps.

The theory column is what the "tensors" measure should keep of ZeRO-0's, per parameter, for fp32 training with Adam
on N ranks once a step is done (DeepSpeed frees the gradients after the step): ZeRO-0 holds weights 4 B + Adam
moments 8 B = 12 B; stages 1 and 2 hold the weights, plus an fp32 master copy and the moments of their 1/N
partition: 4 + 12/N B (stage 2 differs from stage 1 only while gradients exist, inside the step); stage 3 partitions
the weights too, and keeps a gradient partition buffer between steps: 20/N B. (The textbook count with gradients, 16
B at ZeRO-0, is the peak inside a step.)

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
    """The share of ZeRO-0's state a stage keeps after a step (see the docstring)."""
    bytes_per_param = {0: 12, 1: 4 + 12 / n, 2: 4 + 12 / n, 3: 20 / n}[stage]
    return bytes_per_param / 12


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
        rows = [r for r in csv.DictReader(f) if r["template"] in args.templates]
    base = next((r for r in rows if r["zero_stage"] == "0"), None)
    print(f"\n{args.recipe} on {args.ranks} ranks, fp32, micro-batch {args.micro_batch} x {args.seq_len} tokens")
    if base and base["status"] == "ok":
        print(f"parameters: {base['members_params']} ({int(base['parameters']) / 1e6:.0f}M together)")
    print(
        f"{'template':<16} {'stage':>5} {'tensors GB':>10} {'of ZeRO-0':>9} {'theory':>7} {'peak RSS GB':>11} "
        f"{'engines GB':>10} {'of ZeRO-0':>9}  s/step"
    )
    ok = base is not None and base["status"] == "ok"
    for r in rows:
        stage, name = int(r["zero_stage"]), Path(r["template"]).stem
        if r["status"] != "ok":
            print(f"{name:<16} {stage:>5}  failed: {r['error']}")
            continue
        tensors, engine = float(r["tensors_gb_max"]), float(r["engine_memory_gb_max"])
        t_share = tensors / float(base["tensors_gb_max"]) if ok else float("nan")
        e_share = engine / float(base["engine_memory_gb_max"]) if ok else float("nan")
        print(
            f"{name:<16} {stage:>5} {tensors:>10.2f} {t_share:>9.0%} {theory(stage, args.ranks):>7.0%} "
            f"{float(r['peak_memory_gb_max']):>11.2f} {engine:>10.2f} {e_share:>9.0%}  "
            f"{float(r['step_time_median_s']):.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
