"""The experiment's variants as data, and the typed run configs they build.

A variant names a recipe, which model each member starts from, which members train at the experiment's
learning rate, and which experiment setting weighs each edge, keyed by (source, target).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ctcd_ds.config import ExperimentConfig, FinetuneConfig, PretrainConfig, load_config

QUICK = {
    "pretrain_steps": 12,
    "pretrain_batch": 8,
    "finetune_steps": 10,
    "max_train_examples": 512,
    "max_dev_examples": 128,
}
SCALES = {
    "tiny": ("tiny-teacher", "tiny-student"),
    "ratio": ("ratio-teacher", "ratio-student"),
    "paper": ("paper-teacher", "paper-student"),
}
"""The (teacher, student) presets of each ``scale``."""
BIG, SMALL, TEACHER = "big", "small", "standalone teacher"
"""What a member starts from: the scale's larger preset, its smaller preset, or the standalone run's teacher."""


@dataclass(frozen=True, slots=True)
class Variant:
    recipe: str
    starts: dict[str, str]
    """member -> BIG, SMALL or TEACHER."""
    trained: tuple[str, ...]
    """Members trained at ``pretrain_lr`` (the others are frozen)."""
    edge_weights: dict[tuple[str, str], str]
    """(source, target) -> the ExperimentConfig setting that weighs the edge (alpha, beta or peer_weight)."""


VARIANTS: dict[str, Variant] = {
    "standalone": Variant("standalone", {"teacher": BIG, "student": SMALL}, ("teacher", "student"), {}),
    "kd": Variant("kd", {"teacher": TEACHER, "student": SMALL}, ("student",), {("teacher", "student"): "beta"}),
    "ctcd": Variant(
        "ctcd",
        {"teacher": BIG, "student": SMALL},
        ("teacher", "student"),
        {("student", "teacher"): "alpha", ("teacher", "student"): "beta"},
    ),
    "community_kd": Variant(
        "community_kd",
        {"teacher": TEACHER, "student_a": SMALL, "student_b": SMALL},
        ("student_a", "student_b"),
        {
            ("teacher", "student_a"): "beta",
            ("teacher", "student_b"): "beta",
            ("student_a", "student_b"): "peer_weight",
            ("student_b", "student_a"): "peer_weight",
        },
    ),
}


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


def pair(exp: ExperimentConfig) -> tuple[str, str]:
    """The (teacher, student) models of an experiment: its scale's presets, or ``teacher`` / ``student``."""
    big, small = SCALES[exp.scale]
    return exp.teacher or big, exp.student or small


def steps_for(exp: ExperimentConfig, key: str) -> int:
    """A step count or limit of the experiment, the quick one in quick mode."""
    return QUICK[key] if exp.quick else getattr(exp, key)


class Paths:
    """Where each stage of an experiment writes: one pre-training run per variant and pre-training seed, one
    fine-tuning run per model, pre-training seed and fine-tuning seed."""

    def __init__(self, output_dir: str | Path):
        self.out = Path(output_dir)

    def run_dir(self, variant: str, pretrain_seed: int) -> Path:
        return self.out / "pretrain" / f"{variant}-p{pretrain_seed}"

    def export_dir(self, model: Model, pretrain_seed: int) -> Path:
        return self.run_dir(model.variant, pretrain_seed) / "export" / model.member

    def finetune_dir(self, model: Model, pretrain_seed: int, seed: int) -> Path:
        return self.out / "finetune" / f"{model.variant}-{model.member}-p{pretrain_seed}-seed{seed}"


def pretrain_config(exp: ExperimentConfig, name: str, pretrain_seed: int) -> PretrainConfig:
    """The pre-training run of variant ``name`` with ``pretrain_seed`` (initialisation, data order, masks and
    dropout): its recipe with the experiment's models, steps and edge weights, evaluated on the whole held-out
    split. A KD or Community KD teacher is the standalone teacher of the same seed (every comparison is paired)."""
    variant, paths = VARIANTS[name], Paths(exp.output_dir)
    steps = steps_for(exp, "pretrain_steps")
    cfg = load_config(variant.recipe)
    cfg.output_dir = str(paths.run_dir(name, pretrain_seed))
    cfg.seed = pretrain_seed
    cfg.train.steps = steps
    cfg.train.micro_batch_size = steps_for(exp, "pretrain_batch")
    cfg.data.seq_len = exp.pretrain_seq_len
    cfg.train.eval_every = max(1, steps // 6)
    cfg.train.eval_batches = 0  # the whole held-out split: the low-noise metrics
    cfg.checkpoint.every = 0
    if exp.quick:
        cfg.data.max_train_blocks, cfg.train.eval_batches, cfg.data.seq_len = 256, 2, 64
    big, small = pair(exp)
    teacher = str(paths.export_dir(MODELS[0], pretrain_seed))
    starts = {BIG: big, SMALL: small, TEACHER: teacher}
    assert set(cfg.members) == set(variant.starts), (name, list(cfg.members))
    for member, start in variant.starts.items():
        cfg.members[member].model = starts[start]
    for member in variant.trained:
        cfg.members[member].lr = exp.pretrain_lr
    assert {(e.source, e.target) for e in cfg.edges} == set(variant.edge_weights), (name, cfg.edges)
    for i, edge in enumerate(cfg.edges):
        setting = variant.edge_weights[(edge.source, edge.target)]
        edge = dataclasses.replace(edge, weight=getattr(exp, setting), temperature=exp.temperature)
        if setting == "alpha" and exp.alpha_schedule != "constant":
            edge = dataclasses.replace(
                edge, schedule=exp.alpha_schedule, final_weight=exp.alpha_final, schedule_end=1.0
            )
        cfg.edges[i] = edge
    return cfg


def finetune_config(exp: ExperimentConfig, model: Model, pretrain_seed: int, seed: int) -> FinetuneConfig:
    """Fine-tuning ``model`` (pre-trained with ``pretrain_seed``) with ``seed`` on the experiment's task."""
    paths = Paths(exp.output_dir)
    cfg = FinetuneConfig()
    cfg.output_dir = str(paths.finetune_dir(model, pretrain_seed, seed))
    cfg.seed = seed
    member = cfg.members["model"]
    member.model = str(paths.export_dir(model, pretrain_seed))
    member.lr = exp.finetune_lr
    cfg.train.steps = steps_for(exp, "finetune_steps")
    cfg.export = False
    cfg.task = dataclasses.replace(exp.task)
    if exp.quick:
        cfg.task.max_train_examples, cfg.task.max_dev_examples = QUICK["max_train_examples"], QUICK["max_dev_examples"]
    return cfg
