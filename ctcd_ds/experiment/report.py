"""The experiment's report: a markdown table, a JSON file and a PNG plot, and a verdict per claim and metric.

Every variant is pre-trained with the same seeds, and every model fine-tuned with the same seeds, so two
models are compared seed by seed: for each pre-training seed, the difference of their final held-out MLM
loss, of their masked-token accuracy (the whole held-out split), and of their task score (the mean over the
fine-tuning seeds). The difference's mean and its 95% interval are a paired t-interval over the pre-training
seeds (``scipy.stats.ttest_rel``); the verdict reads the interval: "holds" when it excludes zero on the
claimed side, "reversed" when it excludes zero on the other, else "within noise". One pre-training seed gives
no interval.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import stats


@dataclass(slots=True)
class ModelResult:
    label: str
    variant: str
    member: str
    params: int
    pretrain_seeds: list[int]
    mlm_loss: list[float]
    """The final held-out MLM loss of each pre-training seed."""
    mlm_accuracy: list[float]
    """The final held-out masked-token accuracy of each pre-training seed."""
    scores: list[list[float]]
    """The main dev metric of each pre-training seed (outer) and fine-tuning seed (inner)."""
    curve_steps: list[int]
    curve_losses: list[float]
    """Held-out MLM loss over pre-training, the mean over the pre-training seeds."""

    @property
    def task(self) -> list[float]:
        """The task score of each pre-training seed: the mean over its fine-tuning seeds."""
        return [statistics.fmean(s) for s in self.scores]

    def metric(self, name: str) -> list[float]:
        return {"mlm_loss": self.mlm_loss, "mlm_accuracy": self.mlm_accuracy, "task": self.task}[name]


@dataclass(slots=True)
class Results:
    setup: str
    metric: str
    task: str
    rows: list[ModelResult]


METRICS = {"mlm_loss": ("held-out MLM loss", False), "mlm_accuracy": ("masked-token accuracy", True)}
"""name -> (what it is, higher is better); the task's metric is added by name ``task``."""


@dataclass(slots=True)
class Comparison:
    claim: str
    metric: str
    a: str
    b: str
    higher_is_better: bool
    diffs: list[float]
    """a - b for each pre-training seed."""
    mean: float
    low: float | None
    high: float | None
    """The 95% paired t-interval of the mean difference (None with one seed)."""

    @property
    def verdict(self) -> str:
        if self.low is None or self.high is None:
            return "one pre-training seed: no interval"
        better_low, better_high = (self.low, self.high) if self.higher_is_better else (-self.high, -self.low)
        if better_low > 0:
            return "holds"
        if better_high < 0:
            return "reversed"
        return "within noise"


def paired(a: list[float], b: list[float]) -> tuple[float, float | None, float | None]:
    """Mean of ``a - b`` (paired by position) and its 95% t-interval (None, None with fewer than two pairs)."""
    diffs = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    mean = float(diffs.mean())
    if len(diffs) < 2:
        return mean, None, None
    if np.all(diffs == diffs[0]):  # no spread: the interval is the point
        return mean, mean, mean
    low, high = stats.ttest_rel(a, b).confidence_interval(0.95)
    return mean, float(low), float(high)


def compare(claim: str, metric: str, a: ModelResult, b: ModelResult, higher_is_better: bool) -> Comparison:
    mean, low, high = paired(a.metric(metric), b.metric(metric))
    diffs = [x - y for x, y in zip(a.metric(metric), b.metric(metric))]
    return Comparison(claim, metric, a.label, b.label, higher_is_better, diffs, mean, low, high)


CLAIMS = (
    ("(1) the larger model gains from the smaller", "CTCD teacher", "standalone teacher"),
    ("(2) the CTCD student beats the one-way-KD student", "CTCD student", "KD student"),
    ("(2') the CTCD student beats the standalone student", "CTCD student", "standalone student"),
    ("(3) the CTCD student beats the standalone teacher", "CTCD student", "standalone teacher"),
)
"""The paper's claims as (claim, model A, model B): A beats B."""


def comparisons(results: Results) -> list[Comparison]:
    by = {r.label: r for r in results.rows}
    out = []
    for claim, a, b in CLAIMS:
        if a in by and b in by:
            for metric, (_, higher) in METRICS.items():
                out.append(compare(claim, metric, by[a], by[b], higher))
            out.append(compare(claim, "task", by[a], by[b], True))
    return out


def _value(metric: str, x: float) -> str:
    return f"{x:.4f}" if metric == "mlm_loss" else f"{100 * x:.2f}"


def _metric_name(metric: str, results: Results) -> str:
    return METRICS[metric][0] if metric in METRICS else f"{results.task} dev {results.metric}"


def claims_table(results: Results, comps: list[Comparison]) -> str:
    lines = [
        "| claim | metric | A − B (mean over pre-training seeds) | 95% interval | verdict |",
        "|---|---|---:|---|---|",
    ]
    for c in comps:
        interval = f"[{_value(c.metric, c.low)}, {_value(c.metric, c.high)}]" if c.low is not None else "-"
        lines.append(
            f"| {c.claim}: {c.a} vs {c.b} | {_metric_name(c.metric, results)} | {_value(c.metric, c.mean)} | "
            f"{interval} | {c.verdict} |"
        )
    return "\n".join(lines)


def _mean_std(values: list[float], scale: float, digits: int) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.fmean(values):.{digits}f} ± {scale * std:.{digits}f}"


def table(results: Results) -> str:
    n_pre = len(results.rows[0].pretrain_seeds) if results.rows else 0
    n_ft = len(results.rows[0].scores[0]) if results.rows and results.rows[0].scores else 0
    lines = [
        f"| model | params | held-out MLM loss | masked-token accuracy (%) | {results.task} dev {results.metric} (%) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results.rows:
        all_scores = [x for s in r.scores for x in s]
        lines.append(
            f"| {r.label} | {r.params / 1e6:.2f}M | {_mean_std(r.mlm_loss, 1, 4)} | "
            f"{_mean_std(r.mlm_accuracy, 100, 2)} | {_mean_std(all_scores, 100, 2)} |"
        )
    lines.append(
        f"\nmean ± std over {n_pre} pre-training seeds (the task: over {n_pre} × {n_ft} fine-tuning runs); "
        "the held-out numbers on the whole held-out split at the last step"
    )
    return "\n".join(lines)


def write_report(results: Results, out: Path) -> str:
    """results.md, results.json, results.png under ``out``; returns the text to print."""
    comps = comparisons(results)
    body, claims = table(results), claims_table(results, comps)
    md = "\n\n".join([f"# CTCD reproduction\n\n{results.setup}", body, claims, "![results](results.png)"])
    (out / "results.md").write_text(md + "\n")
    rows = [asdict(r) | {"task": r.task} for r in results.rows]
    comparisons_json = [asdict(c) | {"verdict": c.verdict} for c in comps]
    (out / "results.json").write_text(
        json.dumps(
            {"setup": results.setup, "metric": results.metric, "rows": rows, "comparisons": comparisons_json}, indent=2
        )
    )
    plot(results, comps, out / "results.png")
    return f"{results.setup}\n\n{body}\n\n{claims}"


def plot(results: Results, comps: list[Comparison], path: Path) -> None:
    import matplotlib  # optional at import time: only the report draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(METRICS) + ["task"]
    fig, axes = plt.subplots(1, len(metrics) + 1, figsize=(5 * (len(metrics) + 1), 4.8))
    for ax, metric in zip(axes, metrics):
        mine = [c for c in comps if c.metric == metric]
        scale = 1 if metric == "mlm_loss" else 100
        for y, c in enumerate(mine):
            low = c.low if c.low is not None else c.mean
            high = c.high if c.high is not None else c.mean
            color = {"holds": "#2a9d38", "reversed": "#c0392b"}.get(c.verdict, "#555555")
            ax.errorbar(
                scale * c.mean,
                y,
                xerr=[[scale * (c.mean - low)], [scale * (high - c.mean)]],
                fmt="o",
                color=color,
                capsize=4,
            )
            ax.scatter([scale * d for d in c.diffs], [y] * len(c.diffs), s=10, color=color, alpha=0.4)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(mine)), [f"{c.a} − {c.b}" for c in mine], fontsize=8)
        better = "better: left" if metric == "mlm_loss" else "better: right"
        unit = "" if metric == "mlm_loss" else " (points)"
        ax.set_title(f"{_metric_name(metric, results)}{unit}\nA − B, 95% interval ({better})", fontsize=9)
    curves = axes[-1]
    for r in results.rows:
        curves.plot(r.curve_steps, r.curve_losses, marker="o", markersize=3, label=r.label)
    curves.set_xlabel("pre-training step")
    curves.set_ylabel("held-out MLM loss (mean over seeds)")
    curves.set_title("pre-training (from TensorBoard)")
    curves.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
