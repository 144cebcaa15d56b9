"""Fine-tuning learning-rate sweep: dev accuracy of pretrained models at several peak learning rates.

    python benchmarks/finetune_lr_sweep.py --models student=runs/ctcd-tiny/export/student \\
        teacher=runs/ctcd-tiny/export/teacher [--lrs 1e-4 3e-4 1e-3 3e-3] [--seeds 42] [--steps N] \\
        [--out /tmp/sweep] [--section.key=value ...]

Runs ``ctcd-ds finetune --members.model.model=MODEL --members.model.lr=LR --seed=S`` once per model, lr and
seed (a fresh process each, into ``OUT/MODEL-lrLR-seedS``; a run whose ``results.json`` exists is not run
again), with every other setting at its fine-tuning default unless given as an extra ``--section.key=value``
(e.g. ``--task.max_dev_examples=2000``). Prints a table lr x model of the main dev metric (the mean over the
seeds, then each seed's), with the majority-class baseline, and the lr with the best mean per model.

``--quick`` is a smoke test of the script itself (a few steps of few examples), not a measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ctcd_ds.config import FinetuneConfig  # noqa: E402

QUICK = [
    "--task.max_train_examples=64",
    "--task.max_dev_examples=32",
    "--task.seq_len=32",
    "--train.micro_batch_size=8",
]
"""--quick: a smoke run of the sweep itself (seconds per run), not a measurement."""


def run_one(model: str, lr: str, seed: int, steps: int, out: Path, extra: list[str]) -> tuple[dict, float]:
    """(results.json, seconds) of one fine-tuning run, through the command line."""
    results = out / "results.json"
    if not results.is_file():
        command = [
            sys.executable,
            "-m",
            "ctcd_ds.cli",
            "finetune",
            f"--members.model.model={model}",
            f"--members.model.lr={lr}",
            f"--seed={seed}",
            f"--train.steps={steps}",
            f"--output_dir={out}",
            "--export=false",
            "--checkpoint.every=0",
            *extra,
        ]
        start = time.perf_counter()
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        (out.parent / f"{out.name}.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            sys.exit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-3000:]}")
        (out / "sweep_seconds").write_text(f"{seconds:.1f}")
    seconds = float((out / "sweep_seconds").read_text()) if (out / "sweep_seconds").is_file() else float("nan")
    return json.loads(results.read_text()), seconds


def main() -> None:
    default = FinetuneConfig()
    member = default.members["model"]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models", nargs="+", required=True, metavar="NAME=DIR", help="pretrained model directories, by name"
    )
    parser.add_argument("--lrs", nargs="+", default=["1e-4", "3e-4", "1e-3", "3e-3"], help="peak learning rates")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42], help="fine-tuning seeds")
    parser.add_argument(
        "--steps", type=int, default=default.train.steps, help=f"fine-tuning steps (default {default.train.steps})"
    )
    parser.add_argument("--out", default="/tmp/sweep/finetune", help="one run folder per model, lr and seed")
    parser.add_argument("--quick", action="store_true", help="a smoke test of the script (few steps and examples)")
    args, extra = parser.parse_known_args()
    if args.quick:
        args.steps, extra = min(args.steps, 4), [*QUICK, *extra]
    models = dict(m.split("=", 1) for m in args.models)
    out = Path(args.out)
    print(
        f"fine-tuning lr sweep: {args.steps} steps, seeds {args.seeds}, warmup_ratio {member.warmup_ratio}, "
        f"{member.lr_schedule} decay, batch {default.train.micro_batch_size}; extra: {' '.join(extra) or '-'}",
        flush=True,
    )
    scores: dict[tuple[str, str], list[float]] = {}
    baseline, metric, seconds = None, None, []
    for name, model in models.items():
        for lr in args.lrs:
            for seed in args.seeds:
                results, took = run_one(model, lr, seed, args.steps, out / f"{name}-lr{lr}-seed{seed}", extra)
                metric = results["main_metric"]
                dev = next(s for s, info in results["splits"].items() if info["role"] == "dev")
                score = results["members"]["model"][dev][metric]
                baseline = results["majority_baseline"]["accuracy"][dev] if results.get("majority_baseline") else None
                scores.setdefault((name, lr), []).append(score)
                seconds.append(took)
                print(f"  {name:10s} lr {lr:>6s} seed {seed}: dev {metric} {score:.4f}  ({took:.0f} s)", flush=True)
    print(f"\ndev {metric} (mean over seeds {args.seeds}; each seed in brackets)")
    width = max(24, *(len(n) for n in models))
    print(f"{'lr':>8s}  " + "  ".join(f"{n:>{width}s}" for n in models))
    for lr in args.lrs:
        cells = []
        for name in models:
            values = scores[(name, lr)]
            each = " ".join(f"{v:.3f}" for v in values)
            cells.append(f"{statistics.mean(values):.4f} [{each}]" if len(values) > 1 else f"{values[0]:.4f}")
        print(f"{lr:>8s}  " + "  ".join(f"{c:>{width}s}" for c in cells))
    if baseline is not None:
        print(f"majority-class baseline (dev accuracy): {baseline:.4f}")
    for name in models:
        best = max(args.lrs, key=lambda lr: statistics.mean(scores[(name, lr)]))
        print(f"best lr for {name}: {best} ({statistics.mean(scores[(name, best)]):.4f})")
    print(f"runs: {len(seconds)}, {sum(seconds) / 60:.1f} min in all (wall clock, this machine)")


if __name__ == "__main__":
    main()
