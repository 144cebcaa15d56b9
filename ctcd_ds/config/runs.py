"""Run schemas: what `pretrain`, `finetune`, `experiment` and `scale` read, composed from the sections."""

from __future__ import annotations

from dataclasses import dataclass, field

from ctcd_ds.config.sections import (
    CheckpointConfig,
    DataConfig,
    DeepSpeedConfig,
    EdgeConfig,
    LoopConfig,
    MemberConfig,
    Precision,
    PretrainLoopConfig,
    PretrainMemberConfig,
    Scale,
    TaskConfig,
    TokenizerConfig,
    Variant,
    WeightSchedule,
)
from ctcd_ds.errors import UserError


@dataclass(kw_only=True, slots=True)
class PretrainConfig:
    """A co-training run: named members, distillation edges between them, and how to train them on masked LM.
    Without --config the `ctcd` recipe is the run (a teacher and a student distilling from each other)."""

    output_dir: str = "runs/pretrain"
    """Everything of the run goes here: tensorboard/, checkpoints/, export/, tokenizer/, metrics.jsonl."""
    seed: int = 42
    """Seed of model init, data order, masking and dropout."""
    members: dict[str, PretrainMemberConfig] = field(default_factory=dict)
    """The models, by name (the `ctcd` recipe: teacher and student)."""
    edges: list[EdgeConfig] = field(default_factory=list)
    """Distillation edges (empty = every member trains alone)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and held-out text."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """The shared tokenizer."""
    train: PretrainLoopConfig = field(default_factory=PretrainLoopConfig)
    """The training loop."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed engine settings."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    export: bool = True
    """Export every member as a Hugging Face model directory at the end."""
    copied_from: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)
    """Derived, not a setting: the member each copied member's `model` was taken from (to describe it)."""

    def __post_init__(self) -> None:
        """A member whose `model` names another member is a copy of that member's model (resolved here, so
        the rest of the code and the saved config see the preset or directory itself)."""
        for name, m in self.members.items():
            chain = [name]
            while m.model in self.members:
                if m.model in chain:
                    cycle = " -> ".join([*chain, m.model])
                    raise UserError(
                        f"members.{name}.model: the members copy each other's model in a cycle ({cycle}); "
                        "give one of them a preset or a directory"
                    )
                chain.append(m.model)
                m.model = self.members[m.model].model
            if len(chain) > 1:
                self.copied_from[name] = chain[1]


def _finetune_members() -> dict[str, MemberConfig]:
    """lr 3e-4: the rate that learns for both tiny presets on the bundled SST-2 (1e-4 leaves the student at the
    majority-class baseline, 1e-3 collapses the teacher to it: benchmarks/results/cpu-2026-11-27/
    finetune_lr_sweep.txt, docs/finetuning.md)."""
    return {"model": MemberConfig(model="runs/ctcd-tiny/export/student", lr=3e-4, warmup_ratio=0.1)}


@dataclass(kw_only=True, slots=True)
class FinetuneConfig:
    """Fine-tune pretrained members on a task, alone or co-distilling through edges on class logits."""

    output_dir: str = "runs/finetune"
    """Everything of the run goes here: tensorboard/, checkpoints/, export/, results.json, metrics.jsonl."""
    seed: int = 42
    """Seed of the head init, data order and dropout."""
    members: dict[str, MemberConfig] = field(default_factory=_finetune_members)
    """The models to fine-tune, by name: `model` is an exported directory or a member's folder inside a checkpoint
    (checkpoints/step_N/NAME)."""
    edges: list[EdgeConfig] = field(default_factory=list)
    """Co-distillation edges between members, on the class logits (classification only)."""
    task: TaskConfig = field(default_factory=TaskConfig)
    """The task and its data."""
    train: LoopConfig = field(default_factory=lambda: LoopConfig(steps=500, eval_every=0))
    """The training loop."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed engine settings."""
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=100, keep_last=1))
    """Checkpointing."""
    export: bool = True
    """Export every fine-tuned member as a Hugging Face directory at the end."""


def _experiment_task() -> TaskConfig:
    return TaskConfig(max_train_examples=16000, max_dev_examples=2000, seq_len=64)


@dataclass(kw_only=True, slots=True)
class ExperimentConfig:
    """Pre-train standalone / one-way KD / CTCD / Community KD on the same data, steps, batch and seed,
    fine-tune every resulting model on a task over several seeds, and tabulate and plot the results."""

    output_dir: str = "runs/experiment"
    """Each stage writes below it (pretrain/VARIANT, finetune/MODEL-seedS); results.md, results.json and results.png at
    the top. Finished stages are skipped when run again."""
    scale: Scale = "tiny"
    """The teacher/student pair: tiny = the CPU pair (4L-256 and 2L-128, the student 0.28x the teacher's
    parameters); ratio = 6L-256 and 4L-256, the papers' depth ratio at a CPU width (0.77x); paper = 6L-768 and
    4L-768, for GPUs. `teacher` and `student` override either member."""
    teacher: str = ""
    """The larger member's model: a preset (`ctcd-ds presets`) or a pretrained model directory. Empty: the scale's."""
    student: str = ""
    """The smaller member's model: a preset or a pretrained model directory. Empty: the scale's."""
    quick: bool = False
    """A smoke run of tens of steps (what the tests run): overrides the step counts and example limits below."""
    pretrain_steps: int = 1000
    """Pre-training steps of every variant."""
    pretrain_batch: int = 32
    """Pre-training micro-batch (blocks per rank)."""
    pretrain_seq_len: int = 128
    """Tokens per pre-training block ([CLS] and [SEP] included)."""
    pretrain_lr: float = 1e-3
    """Peak learning rate of every member trained in pre-training."""
    variants: list[Variant] = field(default_factory=lambda: ["standalone", "kd", "ctcd", "community_kd"])
    """Pre-training variants to run (standalone: the pair with no edges; its teacher is the KD and Community KD
    teacher)."""
    temperature: float = 2.0
    """tau of every distillation edge."""
    alpha: float = 1.0
    """CTCD weight of student -> teacher (the start weight when alpha_schedule is not constant)."""
    alpha_schedule: WeightSchedule = "constant"
    """How the CTCD student -> teacher weight moves from alpha to alpha_final over the pre-training steps."""
    alpha_final: float = 0.0
    """The student -> teacher weight at the end of pre-training (not used by constant)."""
    beta: float = 1.0
    """Weight of teacher -> student in CTCD, KD and Community KD."""
    peer_weight: float = 1.0
    """Community KD: weight of the student <-> student peer edges (1, as in the paper's Community KD)."""
    pretrain_seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """Pre-training seeds: every variant is pre-trained once per seed (initialisation, data order, masks, dropout),
    the same seeds for every variant, so that variants are compared seed by seed (paired)."""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """Fine-tuning seeds of every pre-trained model."""
    finetune_steps: int = 200
    """Fine-tuning steps of every model and seed."""
    finetune_lr: float = 3e-4
    """Fine-tuning peak learning rate."""
    task: TaskConfig = field(default_factory=_experiment_task)
    """The fine-tuning task (default: the bundled SST-2, its first 16000 training and 2000 dev sentences)."""


@dataclass(kw_only=True, slots=True)
class ScaleConfig:
    """A scaling experiment: one short pre-training run per point of a grid (every combination of the lists below),
    each started through `launchers/pretrain.sh` as a user would, then one table and one plot of them all."""

    output_dir: str = "runs/scale"
    """points/POINT/ holds each point's run, log and result; scaling.csv and scaling.png at the top. Finished
    points are skipped when the sweep is run again."""
    recipes: list[str] = field(default_factory=lambda: ["ctcd"])
    """Recipes (names or YAML files) to sweep."""
    members: list[dict[str, str]] = field(default_factory=list)
    """Models to sweep, each a mapping of member name to preset or directory (e.g. `[{teacher: paper-teacher,
    student: paper-student}]`); empty = each recipe's own."""
    ranks: list[int] = field(default_factory=lambda: [1, 2])
    """Ranks per node (the launcher's NUM_GPUS)."""
    nodes: list[int] = field(default_factory=lambda: [1])
    """Nodes (more than 1 needs `hostfile`)."""
    hostfile: str = ""
    """A DeepSpeed hostfile for multi-node points (the launcher's HOSTFILE)."""
    templates: list[str] = field(default_factory=lambda: ["zero2"])
    """ZeRO templates (zero0 .. zero3, zero2_offload, zero3_offload, or JSON paths)."""
    micro_batch: list[int] = field(default_factory=lambda: [8])
    """Micro-batch sizes (blocks per rank)."""
    grad_accum: list[int] = field(default_factory=lambda: [1])
    """Gradient accumulation steps."""
    precision: list[Precision] = field(default_factory=lambda: ["auto"])
    """Precisions (auto: bf16 on GPUs that have it, else fp32)."""
    seq_len: list[int] = field(default_factory=list)
    """Sequence lengths (empty = each recipe's data.seq_len)."""
    steps: int = 8
    """Training steps of each point."""
    warmup_steps: int = 3
    """Steps left out of the timing at the start of each point (allocation, caches, the first collectives)."""
    cpu_threads_per_rank: int = 0
    """CPU runs: torch threads of each rank (OMP_NUM_THREADS). 0 = the machine's cores / ranks per node. For weak
    scaling on one CPU machine set it to cores / the most ranks swept, so every point gives a rank the same cores."""
    timeout_s: int = 1800
    """A point still running after this many seconds is stopped and recorded as failed."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s of one device, for MFU (0 = look the GPU up; a CPU has no default)."""
    retry_failed: bool = False
    """Run the points that failed in an earlier sweep again (finished ones are always kept)."""
    overrides: list[str] = field(default_factory=list)
    """Settings passed to every point, e.g. `[--data.max_train_blocks=512]`."""
    dry_run: bool = False
    """Print each point's launcher command and exit."""
