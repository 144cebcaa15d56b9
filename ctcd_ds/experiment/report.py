"""The experiment's report: a markdown table, a JSON file and a PNG plot, and a verdict per claim.

Verdicts come from the spread over fine-tuning seeds: a difference of means "holds" only when it exceeds
the noise, defined as two standard errors of the difference, 2 * sqrt(s_a^2 / n_a + s_b^2 / n_b) (about a
95% interval for normal scores); a smaller difference is "within noise", a larger one the other way
"reversed". One seed has no spread: "no noise estimate". Held-out perplexity comes from one pre-training run
per variant, so it is reported as lower / higher only, with that caveat.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(slots=True)
class ModelResult:
    label: str
    variant: str
    member: str
    params: int
    pretrain_eval: dict[str, float]
    """The last held-out MLM numbers (mlm_loss, perplexity, accuracy)."""
    scores: list[float]
    """The main dev metric of every fine-tuning seed."""
    curve_steps: list[int]
    curve_losses: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.scores)

    @property
    def std(self) -> float:
        return statistics.stdev(self.scores) if len(self.scores) > 1 else 0.0


@dataclass(slots=True)
class Results:
    setup: str
    metric: str
    task: str
    rows: list[ModelResult]


def noise(a: list[float], b: list[float]) -> float | None:
    """Two standard errors of the difference of the means of ``a`` and ``b`` (None with one score in either)."""
    if len(a) < 2 or len(b) < 2:
        return None
    return 2 * math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))


def verdict(a: list[float], b: list[float]) -> str:
    """Does mean(a) beat mean(b) beyond the noise? holds | within noise | reversed | no noise estimate."""
    threshold = noise(a, b)
    if threshold is None:
        return "no noise estimate (one seed)"
    diff = statistics.fmean(a) - statistics.fmean(b)
    if diff > threshold:
        return "holds"
    if diff < -threshold:
        return "reversed"
    return "within noise"


def _claim(text: str, metric: str, a: ModelResult, b: ModelResult) -> str:
    band = noise(a.scores, b.scores)
    band_text = f", noise ±{100 * band:.2f}" if band is not None else ""
    return f"{text}: {metric} {100 * a.mean:.2f} vs {100 * b.mean:.2f}{band_text} ({verdict(a.scores, b.scores)})"


def claims(results: Results) -> list[str]:
    by = {r.label: r for r in results.rows}
    out, metric = [], results.metric
    if "CTCD teacher" in by and "standalone teacher" in by:
        a, b = by["CTCD teacher"], by["standalone teacher"]
        line = _claim("(1) CTCD teacher beats the standalone teacher", metric, a, b)
        pa, pb = a.pretrain_eval.get("perplexity"), b.pretrain_eval.get("perplexity")
        if pa is not None and pb is not None:
            lower = "lower" if pa < pb else "not lower"
            line += f"; MLM ppl {pa:.1f} vs {pb:.1f} ({lower}, one run each: no noise estimate)"
        out.append(line)
    if "CTCD student" in by and "KD student" in by:
        line = _claim("(2) CTCD student beats the one-way-KD student", metric, by["CTCD student"], by["KD student"])
        if "standalone teacher" in by:
            line += "; " + _claim("vs the standalone teacher", metric, by["CTCD student"], by["standalone teacher"])
        out.append(line)
    return out


def table(results: Results) -> str:
    n = len(results.rows[0].scores) if results.rows else 0
    lines = [
        f"| model | params | held-out MLM ppl | {results.task} dev {results.metric} (mean ± std, {n} seeds) |",
        "|---|---:|---:|---:|",
    ]
    for r in results.rows:
        ppl = r.pretrain_eval.get("perplexity")
        ppl_text = f"{ppl:.1f}" if ppl is not None else "-"
        lines.append(f"| {r.label} | {r.params / 1e6:.2f}M | {ppl_text} | {100 * r.mean:.2f} ± {100 * r.std:.2f} |")
    return "\n".join(lines)


def write_report(results: Results, out: Path) -> str:
    """results.md, results.json, results.png under ``out``; returns the text to print."""
    text_claims = claims(results)
    body = table(results)
    md = "\n\n".join(
        [
            f"# CTCD reproduction\n\n{results.setup}",
            body,
            "\n".join(f"- {c}" for c in text_claims),
            "![results](results.png)",
        ]
    )
    (out / "results.md").write_text(md + "\n")
    rows = [asdict(r) | {"task_mean": r.mean, "task_std": r.std} for r in results.rows]
    (out / "results.json").write_text(
        json.dumps({"setup": results.setup, "metric": results.metric, "rows": rows, "claims": text_claims}, indent=2)
    )
    plot(results, out / "results.png")
    return f"{results.setup}\n\n{body}\n\n" + "\n".join(text_claims)


def plot(results: Results, path: Path) -> None:
    import matplotlib  # optional at import time: only the report draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results.rows
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(13, 4.8))
    means = [100 * r.mean for r in rows]
    stds = [100 * r.std for r in rows]
    colors = ["#4c72b0" if "teacher" in r.member else "#dd8452" for r in rows]
    bars.bar(range(len(rows)), means, yerr=stds, capsize=4, color=colors)
    bars.set_xticks(range(len(rows)), [r.label for r in rows], rotation=30, ha="right")
    low = min(m - s for m, s in zip(means, stds))
    bars.set_ylim(max(0.0, low - 5), max(m + s for m, s in zip(means, stds)) + 2)
    bars.set_ylabel(f"dev {results.metric} (%)")
    bars.set_title(f"fine-tuned, mean ± std over {len(rows[0].scores)} seeds")
    for r in rows:
        curves.plot(r.curve_steps, r.curve_losses, marker="o", markersize=3, label=r.label)
    curves.set_xlabel("pre-training step")
    curves.set_ylabel("held-out MLM loss")
    curves.set_title("pre-training (from TensorBoard)")
    curves.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
