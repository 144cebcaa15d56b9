"""The experiment's results: a markdown table, a JSON file and a PNG plot (rank 0 only)."""

from __future__ import annotations

import json
import math
from datetime import date
from pathlib import Path

from ctcd_ds.experiment import Experiment, Model, finetune_scores, mean_std, steps_for


def _pretrain_eval(exp: Experiment, model: Model) -> dict[str, float]:
    """The last held-out MLM numbers of a model's pre-training run."""
    last: dict[str, float] = {}
    for line in (exp.run_dir(model.variant) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if f"eval/{model.member}/perplexity" in row:
            last = {k.rsplit("/", 1)[1]: v for k, v in row.items() if k.startswith(f"eval/{model.member}/")}
    return last


def _params(exp: Experiment, model: Model) -> int:
    from safetensors import safe_open

    with safe_open(str(exp.export_dir(model) / "model.safetensors"), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def _curve(exp: Experiment, model: Model) -> tuple[list[int], list[float]]:
    """Held-out MLM loss over pre-training steps, read back from the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(exp.run_dir(model.variant) / "tensorboard"))
    acc.Reload()
    events = acc.Scalars(f"eval/{model.member}/mlm_loss")
    return [e.step for e in events], [e.value for e in events]


def _verdict(a: float, b: float, higher_is_better: bool = True) -> str:
    better = a > b if higher_is_better else a < b
    return "holds" if better else "does not hold"


def write_report(exp: Experiment) -> str:
    rows = []
    for model in exp.models:
        scores = finetune_scores(exp, model)
        mean, std = mean_std(scores)
        ev = _pretrain_eval(exp, model)
        rows.append({"model": model.label, "variant": model.variant, "member": model.member, "params": _params(exp, model),
                     "mlm_perplexity": ev.get("perplexity"), "mlm_accuracy": ev.get("accuracy"), "task_scores": scores, "task_mean": mean, "task_std": std})
    by = {r["model"]: r for r in rows}
    t = exp.exp.task
    task = t.glue or (Path(t.train_file).name if t.train_file else "SST-2 (bundled)")
    metric = json.loads((exp.finetune_dir(exp.models[0], exp.exp.seeds[0]) / "results.json").read_text())["main_metric"]
    lines = [
        f"| model | params | held-out MLM ppl | {task} dev {metric} (mean ± std, {len(exp.exp.seeds)} seeds) |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        ppl = f"{r['mlm_perplexity']:.1f}" if r["mlm_perplexity"] is not None else "-"
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {ppl} | {100 * r['task_mean']:.2f} ± {100 * r['task_std']:.2f} |")
    claims = []
    if "CTCD teacher" in by and "standalone teacher" in by:
        a, b = by["CTCD teacher"], by["standalone teacher"]
        claims.append(f"(1) CTCD teacher beats the standalone teacher: {metric} {100 * a['task_mean']:.2f} vs {100 * b['task_mean']:.2f} "
                      f"({_verdict(a['task_mean'], b['task_mean'])}); MLM ppl {a['mlm_perplexity']:.1f} vs {b['mlm_perplexity']:.1f} "
                      f"({_verdict(a['mlm_perplexity'], b['mlm_perplexity'], higher_is_better=False)})")
    if "CTCD student" in by and "KD student" in by:
        a, b = by["CTCD student"], by["KD student"]
        claim = (f"(2) CTCD student beats the one-way-KD student: {metric} {100 * a['task_mean']:.2f} vs {100 * b['task_mean']:.2f} "
                 f"({_verdict(a['task_mean'], b['task_mean'])})")
        if "standalone teacher" in by:
            t = by["standalone teacher"]
            claim += f"; vs the standalone teacher {100 * t['task_mean']:.2f} ({_verdict(a['task_mean'], t['task_mean'])})"
        claims.append(claim)
    cfg = exp.exp
    alpha = cfg.alpha if cfg.alpha_schedule == "constant" else f"{cfg.alpha}→{cfg.alpha_final} ({cfg.alpha_schedule})"
    setup = (f"{cfg.scale} scale{' (quick)' if cfg.quick else ''}; pre-training {steps_for(cfg, 'pretrain_steps')} steps × batch "
             f"{steps_for(cfg, 'pretrain_batch')}, lr {cfg.pretrain_lr}, τ={cfg.temperature}, α={alpha}, β={cfg.beta}; fine-tuning {steps_for(cfg, 'finetune_steps')} steps, "
             f"lr {cfg.finetune_lr}, seeds {cfg.seeds}; {date.today().isoformat()}")
    table = "\n".join(lines)
    text = "\n\n".join([f"# CTCD reproduction\n\n{setup}", table, "\n".join(f"- {c}" for c in claims), "![results](results.png)"]) + "\n"
    (exp.out / "results.md").write_text(text)
    (exp.out / "results.json").write_text(json.dumps({"setup": setup, "metric": metric, "rows": rows, "claims": claims}, indent=2))
    _plot(exp, rows, metric, exp.out / "results.png")
    return f"{setup}\n\n{table}\n\n" + "\n".join(claims)


def _plot(exp: Experiment, rows: list[dict], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, curves) = plt.subplots(1, 2, figsize=(13, 4.8))
    labels = [r["model"] for r in rows]
    means = [100 * r["task_mean"] for r in rows]
    stds = [100 * r["task_std"] for r in rows]
    colors = ["#4c72b0" if "teacher" in r["member"] else "#dd8452" for r in rows]
    bars.bar(range(len(rows)), means, yerr=stds, capsize=4, color=colors)
    bars.set_xticks(range(len(rows)), labels, rotation=30, ha="right")
    low = min(m - s for m, s in zip(means, stds))
    bars.set_ylim(max(0.0, low - 5), max(m + s for m, s in zip(means, stds)) + 2)
    bars.set_ylabel(f"dev {metric} (%)")
    bars.set_title(f"fine-tuned, mean ± std over {len(exp.exp.seeds)} seeds")
    for model in exp.models:
        steps, values = _curve(exp, model)
        curves.plot(steps, values, marker="o", markersize=3, label=model.label)
    curves.set_xlabel("pre-training step")
    curves.set_ylabel("held-out MLM loss")
    curves.set_title("pre-training (from TensorBoard)")
    curves.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
