"""The CTCD reproduction experiment: same data, steps, batch and seeds for every variant.

1. pre-train: standalone pair (no edges), one-way KD (the standalone teacher, frozen -> a fresh
   student), CTCD (teacher <-> student), Community KD (the standalone teacher -> two students, which
   co-distil);
2. fine-tune every resulting model on the task (default: bundled SST-2) with several seeds;
3. write results.md / results.json / results.png and print the table and the two claims:
   (1) the CTCD teacher beats the standalone teacher; (2) the CTCD student beats the one-way-KD
   student (and ideally the standalone teacher).

Every rank runs the same sequence in process (start it under the deepspeed launcher for several
ranks). A stage whose outputs exist is skipped, so an interrupted experiment continues where it stopped.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from ctcd_ds import dist
from ctcd_ds.config import ExperimentConfig, FinetuneConfig, load_config
from ctcd_ds.graph import SCHEDULES
from ctcd_ds.validation import validate, validate_finetune

QUICK = {"pretrain_steps": 12, "pretrain_batch": 8, "finetune_steps": 10, "max_train_examples": 512, "max_dev_examples": 128}
VARIANTS = ("standalone", "kd", "ctcd", "community_kd")
SCALES = {"tiny": ("tiny-teacher", "tiny-student"), "paper": ("paper-teacher", "paper-student")}


@dataclass(frozen=True, slots=True)
class Model:
    """A pre-trained model the experiment fine-tunes: a member of one variant's run."""

    label: str
    variant: str
    member: str


MODELS = (
    Model("standalone teacher", "standalone", "teacher"),
    Model("standalone student", "standalone", "student"),
    Model("KD student", "kd", "student"),
    Model("CTCD teacher", "ctcd", "teacher"),
    Model("CTCD student", "ctcd", "student"),
    Model("Community KD student A", "community_kd", "student_a"),
    Model("Community KD student B", "community_kd", "student_b"),
)


def experiment_problems(exp: ExperimentConfig) -> list[str]:
    problems = []
    if exp.scale not in SCALES:
        problems.append(f"scale={exp.scale}: must be one of {', '.join(SCALES)}")
    unknown = [v for v in exp.variants if v not in VARIANTS]
    if unknown:
        problems.append(f"variants={exp.variants}: unknown {', '.join(unknown)} (choose from {', '.join(VARIANTS)})")
    if any(v in exp.variants for v in ("kd", "community_kd")) and "standalone" not in exp.variants:
        problems.append("variants: kd and community_kd take their teacher from the standalone run; include standalone")
    if exp.alpha_schedule not in SCHEDULES:
        problems.append(f"alpha_schedule={exp.alpha_schedule}: must be one of {', '.join(SCHEDULES)}")
    if exp.alpha < 0 or exp.alpha_final < 0 or exp.beta < 0:
        problems.append(f"alpha={exp.alpha}, alpha_final={exp.alpha_final}, beta={exp.beta}: edge weights must be >= 0")
    if not exp.seeds:
        problems.append("seeds: give at least one fine-tuning seed")
    for key in ("pretrain_steps", "pretrain_batch", "finetune_steps", "pretrain_lr", "finetune_lr"):
        if getattr(exp, key) <= 0:
            problems.append(f"{key}={getattr(exp, key)}: must be > 0")
    return problems


def steps_for(exp: ExperimentConfig, key: str) -> int:
    """A step count or limit of the experiment, the quick one in quick mode."""
    return QUICK[key] if exp.quick else getattr(exp, key)


class Experiment:
    def __init__(self, exp: ExperimentConfig):
        self.exp = exp
        self.out = Path(exp.output_dir)
        self.models = [m for m in MODELS if m.variant in exp.variants]

    def run_dir(self, variant: str) -> Path:
        return self.out / "pretrain" / variant

    def export_dir(self, model: Model) -> Path:
        return self.run_dir(model.variant) / "export" / model.member

    def finetune_dir(self, model: Model, seed: int) -> Path:
        return self.out / "finetune" / f"{model.variant}-{model.member}-seed{seed}"

    # ---------------------------------------------------------------------------------------------
    def pretrain_overrides(self, variant: str) -> tuple[str, list[str]]:
        exp = self.exp
        big, small = SCALES[exp.scale]
        steps = steps_for(exp, "pretrain_steps")
        common = [
            f"--output_dir={self.run_dir(variant)}",
            f"--train.steps={steps}",
            f"--train.micro_batch_size={steps_for(exp, 'pretrain_batch')}",
            f"--train.eval_every={max(1, steps // 6)}",
            "--checkpoint.every=0",
        ]
        if exp.quick:
            common += ["--data.max_train_blocks=256", "--train.eval_batches=2", "--data.seq_len=64"]
        teacher = str(self.run_dir("standalone") / "export" / "teacher")
        tau = exp.temperature

        def lr(*members: str) -> list[str]:
            return [f"--members.{m}.lr={exp.pretrain_lr}" for m in members]

        if variant == "standalone":
            return "standalone", [*common, f"--members.teacher.model={big}", f"--members.student.model={small}", *lr("teacher", "student")]
        if variant == "ctcd":
            alpha = [f"--edges.0.weight={exp.alpha}", f"--edges.0.schedule={exp.alpha_schedule}"]
            if exp.alpha_schedule != "constant":
                alpha += [f"--edges.0.final_weight={exp.alpha_final}", f"--edges.0.schedule_steps={steps}"]
            return "ctcd", [*common, f"--members.teacher.model={big}", f"--members.student.model={small}", *lr("teacher", "student"), *alpha,
                            f"--edges.1.weight={exp.beta}", f"--edges.0.temperature={tau}", f"--edges.1.temperature={tau}"]
        if variant == "kd":
            return "kd", [*common, f"--members.teacher.model={teacher}", f"--members.student.model={small}", *lr("student"),
                          f"--edges.0.weight={exp.beta}", f"--edges.0.temperature={tau}"]
        assert variant == "community_kd", variant
        edges = [f"--edges.{i}.{k}={v}" for i in range(4) for k, v in (("weight", exp.beta), ("temperature", tau))]
        return "community_kd", [*common, f"--members.teacher.model={teacher}", f"--members.student_a.model={small}", f"--members.student_b.model={small}",
                                *lr("student_a", "student_b"), *edges]

    def finetune_overrides(self, model: Model, seed: int) -> list[str]:
        exp, task = self.exp, self.exp.task
        out = [
            f"--output_dir={self.finetune_dir(model, seed)}",
            f"--seed={seed}",
            f"--members.model.model={self.export_dir(model)}",
            f"--members.model.lr={exp.finetune_lr}",
            f"--train.steps={steps_for(exp, 'finetune_steps')}",
            "--export=false",
        ]
        for key in ("glue", "train_file", "dev_file", "label_column", "kind", "seq_len", "max_train_examples", "max_dev_examples"):
            out.append(f"--task.{key}={getattr(task, key)}")
        out += [f"--task.text_columns=[{','.join(task.text_columns)}]", f"--task.header={str(task.header).lower()}"]
        if exp.quick:
            out += [f"--task.max_train_examples={QUICK['max_train_examples']}", f"--task.max_dev_examples={QUICK['max_dev_examples']}"]
        return out

    # ---------------------------------------------------------------------------------------------
    def run(self) -> str:
        from ctcd_ds.cli import finetune, pretrain

        for variant in self.exp.variants:
            done = dist.broadcast_object(all((self.run_dir(variant) / "export" / m.member / "config.json").is_file() for m in self.models if m.variant == variant))
            if done:
                dist.print0(f"[experiment] pretrain {variant}: done already, skipped")
                continue
            recipe, overrides = self.pretrain_overrides(variant)
            dist.print0(f"[experiment] pretrain {variant}")
            cfg = load_config(recipe, overrides)
            validate(cfg)
            pretrain(cfg)
        for model in self.models:
            for seed in self.exp.seeds:
                if dist.broadcast_object((self.finetune_dir(model, seed) / "results.json").is_file()):
                    continue
                dist.print0(f"[experiment] fine-tune {model.label}, seed {seed}")
                cfg = load_config(None, self.finetune_overrides(model, seed), root=FinetuneConfig)
                validate_finetune(cfg)
                finetune(cfg)
        table = ""
        if dist.is_rank0():
            from ctcd_ds.report import write_report

            table = write_report(self)
        dist.barrier()
        return table


def finetune_scores(exp: Experiment, model: Model) -> list[float]:
    """The main dev metric of every fine-tuning seed of a model."""
    scores = []
    for seed in exp.exp.seeds:
        results = json.loads((exp.finetune_dir(model, seed) / "results.json").read_text())
        split = next(iter(results["members"]["model"].values()))
        scores.append(split[results["main_metric"]])
    return scores


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
