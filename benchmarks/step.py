"""Co-training step time vs the two members trained alone, on the same batches, in one process.

    python benchmarks/step.py [--reps 20] [--config ctcd] [--quick] [--section.key=value ...]

Builds four runs of the same pair (the ``--config`` recipe's teacher and student: the tiny pair by default,
``--config ctcd_paper`` for 6L-768 <-> 4L-768) through the real engines: CTCD (teacher <-> student) with the
default fused KD loss, CTCD with the plain-torch reference loss (``train.kd_loss=reference``), the
teacher alone, the student alone; times one optimizer step of each, interleaved round-robin on
identical batches, and prints medians, tokens/s, the ratio ``ctcd / (teacher + student)`` (target
<= 1.05: co-training costs no more than training both members separately) and the tokens/s gain of
the fused loss over the reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctcd_ds import dist  # noqa: E402
from ctcd_ds.checks import check  # noqa: E402
from ctcd_ds.config import load_config  # noqa: E402
from ctcd_ds.tasks import MaskedLM  # noqa: E402
from ctcd_ds.trainer import Trainer  # noqa: E402

QUICK = ["--data.seq_len=32", "--data.max_train_blocks=64", "--train.micro_batch_size=4", "--tokenizer.vocab_size=1000"]
"""--quick: a smoke run of the benchmark itself (seconds), not a measurement."""


def build(config: str, name: str, out: Path, overrides: list[str], alone: str | None = None) -> Trainer:
    """The recipe's CTCD run, or (``alone``) just that member with no edges."""
    cfg = load_config(config, [*overrides, f"--output_dir={out / name}"])
    if alone:
        cfg.members = {alone: cfg.members[alone]}
        cfg.edges = []
    check(cfg)
    return Trainer(cfg, MaskedLM(cfg))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--config", default="ctcd", help="a recipe with a teacher and a student (e.g. ctcd_paper)")
    parser.add_argument("--quick", action="store_true", help="2 steps of tiny shapes: checks that the benchmark runs")
    args, overrides = parser.parse_known_args()
    if args.quick:
        args.reps, args.warmup, overrides = 2, 1, [*QUICK, *overrides]
    dist.init_distributed()
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            "ctcd": build(args.config, "ctcd", Path(tmp), overrides),
            "ctcd_ref": build(args.config, "ctcd_ref", Path(tmp), [*overrides, "--train.kd_loss=reference"]),
            "teacher": build(args.config, "teacher", Path(tmp), overrides, alone="teacher"),
            "student": build(args.config, "student", Path(tmp), overrides, alone="student"),
        }
        loader = iter(runs["ctcd"].task.loader)
        batches = [next(loader) for _ in range(args.warmup + args.reps)]
        times: dict[str, list[float]] = {k: [] for k in runs}
        for i, batch in enumerate(batches):  # round-robin: every variant sees the same batch in turn
            for name, trainer in runs.items():
                t0 = time.perf_counter()
                trainer.step_fn(iter([batch] * trainer.cfg.train.grad_accum_steps), trainer.step)
                dist.synchronize()  # the step only queues work on a GPU
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
        for trainer in runs.values():
            trainer.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = runs["ctcd"].tokens_per_step
    ratio = med["ctcd"] / (med["teacher"] + med["student"])
    print(f"{'variant':10s} {'step ms':>9s} {'tokens/s':>10s}")
    for name, t in med.items():
        print(f"{name:10s} {1000 * t:9.1f} {tokens / t:10.0f}")
    print(
        f"{'t + s':10s} {1000 * (med['teacher'] + med['student']):9.1f} "
        f"{tokens / (med['teacher'] + med['student']):10.0f}"
    )
    print(
        json.dumps(
            {
                "ctcd_over_separate": round(ratio, 4),
                "ctcd_reference_loss_over_separate": round(med["ctcd_ref"] / (med["teacher"] + med["student"]), 4),
                "ctcd_tokens_per_s": round(tokens / med["ctcd"], 1),
                "fused_over_reference_tokens_per_s": round(med["ctcd_ref"] / med["ctcd"], 4),
                "kd_loss": runs["ctcd"].cfg.train.kd_loss,
                "config": args.config,
                "precision": runs["ctcd"].precision,
                "device": str(dist.device()),
                "target": 1.05,
            }
        )
    )
    dist.cleanup()


if __name__ == "__main__":
    main()
