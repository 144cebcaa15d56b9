"""A sweep's rows: scaling efficiencies against the 1-rank point, the CSV and the plot.

Weak scaling keeps the work per rank (micro-batch and accumulation) and adds ranks: efficiency =
tokens/s per rank at N ranks / tokens/s of the 1-rank point with the same micro-batch. Strong scaling keeps the
global batch (micro-batch x accumulation x ranks) and divides it: efficiency = tokens/s at N ranks / (N x tokens/s
of the 1-rank point with that global batch). A row without such a 1-rank point has no efficiency.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

COLUMNS = [
    "name", "status", "error", "recipe", "members", "members_params", "parameters", "nodes", "ranks_per_node",
    "world_size", "template", "zero_stage", "precision", "micro_batch", "grad_accum", "seq_len", "tokens_per_step",
    "timed_steps", "step_time_median_s", "step_time_min_s", "step_time_max_s", "tokens_per_s",
    "tokens_per_s_per_rank", "weak_scaling_efficiency", "strong_scaling_efficiency", "memory_kind",
    "peak_memory_gb_max", "peak_memory_gb_per_rank", "engine_memory_gb_max", "tensors_gb_max", "reserved_gb_max",
    "flops_per_token", "model_tflops", "peak_tflops", "mfu", "cpu_threads_per_rank", "wall_s",
]  # fmt: skip
SAME_MODEL = ("recipe", "members", "template", "precision", "seq_len")
"""What a row must share with its 1-rank reference (the models, the engine set-up and the tokens per sample)."""


def add_efficiencies(rows: list[dict]) -> None:
    ok = [r for r in rows if r["status"] == "ok"]
    singles = [r for r in ok if r["world_size"] == 1]
    for r in ok:
        same = [s for s in singles if all(s[k] == r[k] for k in SAME_MODEL)]
        weak = next(
            (s for s in same if (s["micro_batch"], s["grad_accum"]) == (r["micro_batch"], r["grad_accum"])), None
        )
        strong = next((s for s in same if _global_batch(s) == _global_batch(r)), None)
        r["weak_scaling_efficiency"] = r["tokens_per_s_per_rank"] / weak["tokens_per_s"] if weak else None
        r["strong_scaling_efficiency"] = (
            r["tokens_per_s"] / (r["world_size"] * strong["tokens_per_s"]) if strong else None
        )


def _global_batch(r: dict) -> int:
    return r["micro_batch"] * r["grad_accum"] * r["world_size"]


def write_csv(rows: list[dict], path: Path) -> None:
    """One row per point (failed ones with their error), written to a temporary file and renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _cell(r.get(k)) for k in COLUMNS})
    os.replace(tmp, path)


def _cell(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def _label(r: dict, varying: list[str]) -> str:
    return " ".join(f"{k}={r[k]}" for k in varying) or r["recipe"]


def write_plot(rows: list[dict], path: Path) -> None:
    """Left: tokens/s against ranks, one line per setting (ideal linear scaling dashed). Right: peak memory per rank
    against the ZeRO stage, one bar group per world size. Failed points are marked with an x at the bottom."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("recipe", "members", "template", "precision", "seq_len", "micro_batch", "grad_accum")
    varying = [k for k in keys if len({str(r.get(k)) for r in rows}) > 1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(_label(r, [k for k in varying if k != "template"] + ["template"]), []).append(r)
    for label, group in groups.items():
        ok = sorted((r for r in group if r["status"] == "ok"), key=lambda r: r["world_size"])
        if ok:
            (line,) = left.plot([r["world_size"] for r in ok], [r["tokens_per_s"] for r in ok], "o-", label=label)
            base = next((r for r in ok if r["world_size"] == 1), None)
            if base and len(ok) > 1:
                ws = [r["world_size"] for r in ok]
                left.plot(ws, [base["tokens_per_s"] * w for w in ws], "--", color=line.get_color(), alpha=0.4)
        failed = [r for r in group if r["status"] != "ok"]
        if failed:
            left.plot([r["world_size"] for r in failed], [0] * len(failed), "x", color="red")
    left.set(xlabel="ranks (world size)", ylabel="tokens/s (all ranks)", title="Throughput (dashed: linear scaling)")
    left.set_xticks(sorted({r["world_size"] for r in rows}))
    left.legend(fontsize=7)
    left.grid(alpha=0.3)

    stages = sorted({r["zero_stage"] for r in rows})
    worlds = sorted({r["world_size"] for r in rows})
    width = 0.8 / max(len(worlds), 1)
    for i, w in enumerate(worlds):
        heights = []
        for stage in stages:
            ok = [
                r["peak_memory_gb_max"]
                for r in rows
                if r["status"] == "ok" and (r["zero_stage"], r["world_size"]) == (stage, w)
            ]
            heights.append(min(ok) if ok else 0.0)
        right.bar([s + (i - (len(worlds) - 1) / 2) * width for s in stages], heights, width, label=f"{w} ranks")
    kinds = {r.get("memory_kind") for r in rows if r["status"] == "ok"}
    right.set(
        xlabel="ZeRO stage",
        ylabel=f"peak memory per rank, GB ({', '.join(sorted(k for k in kinds if k)) or 'none measured'})",
        title="Memory per rank by ZeRO stage (smallest over the other settings)",
    )
    right.set_xticks(stages)
    right.legend(fontsize=7)
    right.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def table(rows: list[dict]) -> str:
    """A short text table of the rows for the terminal."""
    head = f"{'point':<44} {'tokens/s':>10} {'per rank':>9} {'weak eff':>8} {'step s':>8} {'mem GB':>7} {'MFU':>6}"
    lines = [head]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['name']:<44} failed: {r['error']}")
            continue
        eff, mfu = r.get("weak_scaling_efficiency"), r.get("mfu")
        lines.append(
            f"{r['name']:<44} {r['tokens_per_s']:>10.0f} {r['tokens_per_s_per_rank']:>9.0f} "
            f"{'' if eff is None else f'{eff:.0%}':>8} {r['step_time_median_s']:>8.3f} {r['peak_memory_gb_max']:>7.2f} "
            f"{'' if mfu is None else f'{mfu:.1%}':>6}"
        )
    return "\n".join(lines)
