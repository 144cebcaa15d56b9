"""MFU ablation: each GPU-efficiency lever switched off (or on) against the defaults, through the real engines.

    python benchmarks/mfu_ablation.py [--config ctcd_paper] [--steps 20] [--warmup 5] [--out DIR]
                                      [--only NAME ...] [--quick] [--section.key=value ...]

For the defaults, the teacher alone and the student alone (for ``CTCD / (teacher + student)``), then every
other variant of :data:`VARIANTS` (one lever changed each), one process builds the recipe's run, trains
``--warmup`` steps, then times ``--steps`` steps as the training loop runs them (statistics read every
``train.log_every`` steps) and frees it before the next. The report is rewritten after every variant, so a
time limit keeps what was measured. Prints a table (tokens/s, model TFLOP/s, MFU when the
device's peak is known, peak memory, each against the defaults) and writes it with the raw figures to
``--out`` (``ablation.json``, ``ablation.md``). Model FLOPs as ``ctcd_ds.perf`` counts them.

On a CPU it runs (``--quick`` checks the script in seconds), but the levers are GPU levers: only GPU figures
say what they give.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.step import build  # noqa: E402  (the recipe's run, or one member alone)
from ctcd_ds import dist, perf  # noqa: E402
from ctcd_ds.config import load_config  # noqa: E402
from ctcd_ds.step import LogWindow  # noqa: E402
from ctcd_ds.trainer import Trainer  # noqa: E402

QUICK = ["--data.seq_len=32", "--data.max_train_blocks=64", "--train.micro_batch_size=4", "--tokenizer.vocab_size=1000"]
"""--quick: a smoke run of the script itself (seconds), not a measurement."""

VARIANTS: dict[str, list[str]] = {
    "defaults": [],
    # one device wait per step (the loop before 2026-11-28 also waited at every forward and KD backward)
    "statistics read every step": ["--train.log_every=1"],
    "AdamW not fused": ["--train.fused_optimizer=false"],
    "eager attention": ["--train.attention=eager"],
    "reference KD loss": ["--train.kd_loss=reference"],
    "ZeRO-0": ["--deepspeed.template=zero0"],
    "micro-batch x2": [],  # filled in from the recipe's micro-batch
    "compiled": ["--train.compile=true"],
}
"""Each lever against the defaults (``ctcd_ds/config/sections.py``: fused AdamW, SDPA attention, the fused KD
loss, statistics read every ``log_every`` steps, no torch.compile; the recipe's ZeRO template and micro-batch).
``--warmup`` must cover compilation for ``compiled`` (the first step, and one recompile when the number of
masked positions first changes)."""

ALONE = ("teacher", "student")


def measure(trainer: Trainer, warmup: int, steps: int) -> dict:
    """Tokens/s of ``steps`` steps as the training loop runs them, after ``warmup`` steps."""
    batches, log_every = iter(trainer.task.loader), trainer.cfg.train.log_every
    window = LogWindow(trainer.cfg.train.grad_accum_steps)
    for step in range(warmup):
        window.add(trainer.step_fn(batches, step))
    window.read()
    if dist.device().type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for step in range(warmup, warmup + steps):
        window.add(trainer.step_fn(batches, step))
        if (step + 1) % log_every == 0:
            window.read()
    dist.synchronize()
    seconds = time.perf_counter() - start
    tokens_per_s = steps * trainer.tokens_per_step / seconds
    row = {
        "tokens_per_s": tokens_per_s,
        "step_ms": 1e3 * seconds / steps,
        "peak_memory_gb": dist.peak_memory_bytes() / 2**30,
        "model_tflops": None,
        "mfu": None,
    }
    if trainer.flops_per_token:
        row["model_tflops"] = perf.model_tflops(tokens_per_s, trainer.flops_per_token)
        if trainer.peak_tflops:
            row["mfu"] = perf.mfu(tokens_per_s, trainer.flops_per_token, trainer.peak_tflops, dist.world_size())
    return row


def run_variant(config: str, overrides: list[str], warmup: int, steps: int, alone: str | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build(config, "run", Path(tmp), overrides, alone)
        try:
            return measure(trainer, warmup, steps)
        finally:
            trainer.close()
            del trainer
            gc.collect()
            if dist.device().type == "cuda":
                torch.cuda.empty_cache()


def table(rows: dict[str, dict], ratio: float | None) -> str:
    base = rows["defaults"]
    lines = [
        "| variant | tokens/s | vs defaults | step ms | model TFLOP/s | MFU | peak memory GB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:80]} | | | | | |")
            continue
        tflops = f"{r['model_tflops']:.2f}" if r["model_tflops"] is not None else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        lines.append(
            f"| {name} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.3f} | "
            f"{r['step_ms']:.1f} | {tflops} | {mfu} | {r['peak_memory_gb']:.2f} |"
        )
    if ratio is not None:
        lines.append(f"\nCTCD step / (teacher step + student step) at the defaults: **{ratio:.3f}**")
    return "\n".join(lines)


def write_report(report: dict, out: Path) -> None:
    """``ablation.json`` and ``ablation.md`` of what has run so far; the ratio once the defaults and both members
    alone have."""
    rows, alone = report["rows"], report["alone"]
    timed = [rows.get("defaults", {}), *(alone.get(m, {}) for m in ALONE)]
    if all("step_ms" in r for r in timed):
        report["ctcd_over_separate"] = timed[0]["step_ms"] / sum(r["step_ms"] for r in timed[1:])
    (out / "ablation.json").write_text(json.dumps(report, indent=1))
    if "tokens_per_s" in rows.get("defaults", {}):
        text = table(rows, report["ctcd_over_separate"])
        title = f"# MFU ablation: {report['config']} on {report['device']}, {report['steps']} steps"
        (out / "ablation.md").write_text(f"{title}\n\n{text}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="ctcd_paper", help="a recipe with a teacher and a student")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (allocations, autotuning)")
    parser.add_argument("--out", default="runs/mfu_ablation", help="where ablation.json and ablation.md go")
    parser.add_argument("--only", nargs="*", help="these variants only (the defaults always run)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 steps: checks that the script runs")
    args, overrides = parser.parse_known_args()
    if args.quick:
        args.steps, args.warmup, overrides = 2, 1, [*QUICK, *overrides]
    dist.init_distributed()
    micro = load_config(args.config, overrides).train.micro_batch_size
    variants = VARIANTS | {"micro-batch x2": [f"--train.micro_batch_size={2 * micro}"]}
    if args.only:
        variants = {k: v for k, v in variants.items() if k == "defaults" or k in args.only}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if dist.device().type == "cuda" else "cpu"
    report = {"config": args.config, "overrides": overrides, "device": device, "steps": args.steps}
    report |= {"rows": {}, "alone": {}, "ctcd_over_separate": None}
    # the defaults and each member alone first (the goal's figures), then the levers; the report is rewritten after
    # every run, so a time limit or a crash keeps what was measured
    runs = [("defaults", [], None)] + [(m, [], m) for m in ALONE]
    runs += [(name, extra, None) for name, extra in variants.items() if name != "defaults"]
    for name, extra, alone in runs:
        print(f"== {name if not alone else name + ' alone'} {' '.join(extra)}", flush=True)
        try:
            row = run_variant(args.config, [*overrides, *extra], args.warmup, args.steps, alone=alone)
        except Exception as exc:  # noqa: BLE001 (e.g. out of memory: a row that says so, the others still run)
            row = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(row), flush=True)
        report["alone" if alone else "rows"][name] = row
        write_report(report, out)
    if "tokens_per_s" in report["rows"]["defaults"]:
        print(table(report["rows"], report["ctcd_over_separate"]))
    dist.cleanup()


if __name__ == "__main__":
    main()
