"""Run an experiment: pre-train every variant, fine-tune every model over the seeds, collect the results.

Every rank runs the same sequence in process (start it under the deepspeed launcher for several ranks).
A stage whose outputs exist is skipped, so an interrupted experiment continues where it stopped.
"""

from __future__ import annotations

import json
import math
import statistics
from datetime import date

from safetensors import safe_open
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ctcd_ds import dist
from ctcd_ds.checks import check
from ctcd_ds.config import ExperimentConfig
from ctcd_ds.experiment.report import ModelResult, Results, write_report
from ctcd_ds.experiment.variants import MODELS, Model, Paths, finetune_config, pair, pretrain_config, steps_for
from ctcd_ds.layout import METRICS_FILE
from ctcd_ds.trainer import run_finetune, run_pretrain


class Experiment:
    def __init__(self, exp: ExperimentConfig):
        self.exp = exp
        self.paths = Paths(exp.output_dir)
        self.models = [m for m in MODELS if m.variant in exp.variants]

    def run(self) -> str:
        """Run every stage not done yet; rank 0 writes the report. Returns the printed summary."""
        for pseed in self.exp.pretrain_seeds:
            for variant in self.exp.variants:
                exports = [self.paths.export_dir(m, pseed) / "config.json" for m in self.models if m.variant == variant]
                if dist.broadcast_object(all(p.is_file() for p in exports)):
                    dist.print0(f"[experiment] pretrain {variant}, seed {pseed}: done already, skipped")
                    continue
                dist.print0(f"[experiment] pretrain {variant}, seed {pseed}")
                cfg = pretrain_config(self.exp, variant, pseed)
                check(cfg)
                run_pretrain(cfg)
        for pseed in self.exp.pretrain_seeds:
            for model in self.models:
                for seed in self.exp.seeds:
                    if dist.broadcast_object((self.paths.finetune_dir(model, pseed, seed) / "results.json").is_file()):
                        continue
                    dist.print0(f"[experiment] fine-tune {model.label} (pre-training seed {pseed}), seed {seed}")
                    cfg = finetune_config(self.exp, model, pseed, seed)
                    check(cfg)
                    run_finetune(cfg)
        summary = write_report(self.results(), self.paths.out) if dist.is_rank0() else ""
        dist.barrier()
        return summary

    def results(self) -> Results:
        rows, metric = [], ""
        for model in self.models:
            scores, losses, accuracies, curves = [], [], [], []
            for pseed in self.exp.pretrain_seeds:
                per_seed = []
                for seed in self.exp.seeds:
                    results = json.loads((self.paths.finetune_dir(model, pseed, seed) / "results.json").read_text())
                    metric = results["main_metric"]
                    per_seed.append(next(iter(results["members"]["model"].values()))[metric])
                scores.append(per_seed)
                final = self._pretrain_eval(model, pseed)
                losses.append(final["mlm_loss"])
                accuracies.append(final["accuracy"])
                curves.append(self._curve(model, pseed))
            steps = curves[0][0]
            mean_curve = [statistics.fmean(c[1][i] for c in curves) for i in range(len(steps))]
            params = self._params(model, self.exp.pretrain_seeds[0])
            rows.append(
                ModelResult(
                    model.label,
                    model.variant,
                    model.member,
                    params,
                    list(self.exp.pretrain_seeds),
                    losses,
                    accuracies,
                    scores,
                    steps,
                    mean_curve,
                )
            )
        return Results(self._setup(), metric, self._task_name(), rows)

    def _setup(self) -> str:
        cfg = self.exp
        teacher, student = pair(cfg)
        alpha = (
            cfg.alpha if cfg.alpha_schedule == "constant" else f"{cfg.alpha}→{cfg.alpha_final} ({cfg.alpha_schedule})"
        )
        return (
            f"{cfg.scale} scale, teacher {teacher} ↔ student {student}{' (quick)' if cfg.quick else ''}; "
            f"pre-training {steps_for(cfg, 'pretrain_steps')} "
            "steps × batch "
            f"{steps_for(cfg, 'pretrain_batch')}, lr {cfg.pretrain_lr}, τ={cfg.temperature}, α={alpha}, β={cfg.beta}, "
            f"peer weight {cfg.peer_weight}; fine-tuning {steps_for(cfg, 'finetune_steps')} steps, "
            f"lr {cfg.finetune_lr}; pre-training seeds {cfg.pretrain_seeds} x fine-tuning seeds {cfg.seeds}; "
            f"{date.today().isoformat()}"
        )

    def _task_name(self) -> str:
        t = self.exp.task
        return t.glue or (t.train_file.rsplit("/", 1)[-1] if t.train_file else "SST-2 (bundled)")

    def _pretrain_eval(self, model: Model, pseed: int) -> dict[str, float]:
        """The last held-out MLM numbers (mlm_loss, perplexity, accuracy) of a model's pre-training run."""
        last: dict[str, float] = {}
        for line in (self.paths.run_dir(model.variant, pseed) / METRICS_FILE).read_text().splitlines():
            row = json.loads(line)
            if f"eval/{model.member}/perplexity" in row:
                last = {k.rsplit("/", 1)[1]: v for k, v in row.items() if k.startswith(f"eval/{model.member}/")}
        return last

    def _params(self, model: Model, pseed: int) -> int:
        with safe_open(str(self.paths.export_dir(model, pseed) / "model.safetensors"), framework="pt") as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())

    def _curve(self, model: Model, pseed: int) -> tuple[list[int], list[float]]:
        """Held-out MLM loss over pre-training steps, read back from the run's TensorBoard events."""
        acc = EventAccumulator(str(self.paths.run_dir(model.variant, pseed) / "tensorboard"))
        acc.Reload()
        events = acc.Scalars(f"eval/{model.member}/mlm_loss")
        return [e.step for e in events], [e.value for e in events]
