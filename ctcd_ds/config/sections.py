"""Config sections: each setting is declared here once, with its type, default and the one-line doc that
``--help`` prints. Choices are ``Literal`` types, checked when a config is built (``loading.py``).
Run schemas compose these sections (``runs.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Precision = Literal["auto", "fp32", "bf16", "fp16"]
KdLoss = Literal["fused", "reference"]
Attention = Literal["sdpa", "eager"]
LrSchedule = Literal["linear", "cosine", "constant"]
WeightSchedule = Literal["constant", "linear", "cosine", "step"]
TaskKind = Literal["auto", "classification", "regression"]
Scale = Literal["tiny", "ratio", "paper"]
Variant = Literal["standalone", "kd", "ctcd", "community_kd"]


@dataclass(kw_only=True, slots=True)
class PruneConfig:
    """HomoDistil: prune this member structurally while it trains (BERT models, ZeRO stages 0-2)."""

    hidden_size: int = 0
    """Target hidden width; a multiple of the head size, and the pruned model keeps hidden_size / head size heads per
    layer. 0 = keep the width (with intermediate_size 0: no pruning)."""
    intermediate_size: int = 0
    """Target FFN neurons per layer. 0 = keep them."""
    start: float = 0.0
    """Fraction of train.steps at which pruning starts (importance is tracked from the first step)."""
    end: float = 0.7
    """Fraction of train.steps by which the target is reached, on a cubic schedule; the rest of the run trains the
    pruned shape."""
    every: int = 1
    """Prune every N steps between start and end."""
    ema: float = 0.85
    """Smoothing of the importance scores |theta * dL/dtheta| across steps (0 = the current step only)."""

    @property
    def enabled(self) -> bool:
        return self.hidden_size > 0 or self.intermediate_size > 0


@dataclass(kw_only=True, slots=True)
class MiniDiscConfig:
    """MiniDisc: start this member (a teacher assistant) as the best of several one-shot prunings of its `model`; or
    train it sandwich-style."""

    sparsities: list[float] = field(default_factory=list)
    """Width sparsities of the candidates, e.g. [0.25, 0.5, 0.75]: each keeps (1 - s) of the heads (so of the hidden
    width) and of the FFN neurons. Empty = off."""
    lam: float = 0.2
    """lambda in score = held-out MLM accuracy + lambda * s, with s the candidate's parameter sparsity; the best score
    wins."""
    batches: int = 4
    """Training micro-batches whose MLM-loss sensitivities |theta * dL/dtheta| rank the structures to prune."""
    sandwich: list[float] = field(default_factory=list)
    """Sandwich training of this member (e.g. the student): its incoming KD (and hidden-state) losses are averaged over
    the full model and weight-shared sub-networks at these width sparsities, e.g. [0.5]; each sub-network keeps the
    heads, FFN neurons and hidden dims most important by running |theta * dL/dtheta| (EMA 0.85). Empty = off."""


@dataclass(kw_only=True, slots=True)
class MemberConfig:
    """One model of a run: its weights and its own optimizer."""

    model: str = ""
    """A model preset (see `ctcd-ds presets`), a Hugging Face model directory with pretrained weights, or the name of
    another member: a copy of that member's model (its weights when that is a directory, as in HomoDistil and
    MiniDisc; a fresh init of the same preset otherwise)."""
    trainable: bool = True
    """Train this member. A frozen member (false) must be pretrained (`model` is a directory); it only teaches."""
    lr: float = 5e-4
    """Peak learning rate of this member's AdamW."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and LayerNorm weights)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.98
    """AdamW beta2."""
    warmup_ratio: float = 0.06
    """Fraction of `train.steps` spent warming the learning rate up linearly from 0."""
    lr_schedule: LrSchedule = "linear"
    """Learning-rate decay after warm-up."""


@dataclass(kw_only=True, slots=True)
class PretrainMemberConfig(MemberConfig):
    """A pre-training member: a member that may also be remapped, pruned or chosen by MiniDisc."""

    init_from: str = ""
    """Parameter remapping (DWT): initialise this preset member from a smaller pretrained model directory — embeddings,
    head and layers 1..k copied, the last layer repeated for the extra ones; hidden and FFN sizes must match. Empty:
    random init."""
    prune: PruneConfig = field(default_factory=PruneConfig)
    """HomoDistil structured pruning of this member while it trains (off by default)."""
    minidisc: MiniDiscConfig = field(default_factory=MiniDiscConfig)
    """MiniDisc teacher-assistant selection, or sandwich training, of this member (off by default)."""


@dataclass(kw_only=True, slots=True)
class EdgeConfig:
    """A distillation edge: `source` teaches `target`."""

    source: str
    """Name of the teaching member (its predictions are detached)."""
    target: str
    """Name of the learning member; the edge's loss is added to this member's loss."""
    weight: float = 1.0
    """Weight of `tau^2 * KL(p_source || p_target)` in the target's loss (alpha / beta in CTCD); the start weight of a
    schedule."""
    temperature: float = 2.0
    """Softmax temperature tau of both distributions."""
    schedule: WeightSchedule = "constant"
    """How the weight moves from `weight` to `final_weight` over the first `schedule_end` of the run (step: jumps
    there)."""
    final_weight: float = 1.0
    """The weight from `schedule_end` on (not used by constant)."""
    schedule_end: float = 1.0
    """Fraction of `train.steps` over which the weight decays (linear, cosine) or after which it switches (step);
    the same unit as `warmup_ratio` and `prune.start/end`. E.g. 0.4 = the first 40% of the steps."""
    hidden_weight: float = 0.0
    """Weight of the MSE between the source's and the target's last hidden states at the masked positions (HomoDistil);
    needs equal hidden sizes; over the dims the target keeps when it is being pruned. 0 = off."""


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where the pre-training text comes from and how it becomes masked blocks."""

    train_files: list[str] = field(default_factory=list)
    """Local text files (one document or paragraph per line). Empty: the WikiText-2 text bundled in the package."""
    eval_files: list[str] = field(default_factory=list)
    """Held-out text files. Empty: the bundled WikiText-2 valid split, or `eval_fraction` of a user corpus."""
    dataset: str = ""
    """A `datasets.load_dataset` name (needs the hub) used instead of local files, e.g. wikitext."""
    dataset_config: str = ""
    """The `load_dataset` config name, e.g. wikitext-103-raw-v1."""
    text_column: str = "text"
    """Column holding the text when `dataset` is used."""
    eval_fraction: float = 0.02
    """Share of training blocks held out for evaluation when no eval files/split are given."""
    seq_len: int = 128
    """Tokens per block, [CLS] and [SEP] included. Must not exceed any member's max positions."""
    mlm_probability: float = 0.15
    """Share of tokens selected for prediction (80% [MASK], 10% random, 10% kept)."""
    max_train_blocks: int = 0
    """Use only the first N training blocks (0 = all); for quick runs."""
    cache_dir: str = ""
    """`datasets` cache directory (tokenized blocks are fingerprint-cached there). Empty: the datasets default."""
    num_proc: int = 0
    """Processes that tokenize the text (`datasets.map`). 0 = auto: one per usable CPU core, at most 16, for
    text of 32 MB or more (a `dataset` counts as large), else 1. The blocks are the same for any value."""
    prepared: str = ""
    """A directory written by `ctcd-ds prepare-data` (docs/data.md): every rank reads its blocks memory-mapped
    instead of tokenizing text; its seq_len and tokenizer must be the run's, and a run without tokenizer.path
    uses its tokenizer. Empty: tokenize the text of this section."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""


@dataclass(kw_only=True, slots=True)
class TokenizerConfig:
    """The one tokenizer every member shares."""

    path: str = ""
    """An existing tokenizer directory. Empty: a pretrained member's tokenizer if it has one, else train a
    SentencePiece unigram tokenizer on the training text."""
    vocab_size: int = 8192
    """Vocabulary size of a newly trained tokenizer: 5 BERT special tokens, 256 byte pieces (no character is ever
    [UNK]) and the learned pieces; at least 325."""
    max_sentences: int = 200000
    """At most this many lines of the training corpus are fed to SentencePiece."""


@dataclass(kw_only=True, slots=True)
class LoopConfig:
    """The training loop (pre-training and fine-tuning alike)."""

    steps: int = 250
    """Optimizer steps to train for (each step is `grad_accum_steps` micro-batches on every rank)."""
    micro_batch_size: int = 32
    """Examples (blocks) per micro-batch per rank; every member sees the same batch."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    grad_clip: float = 1.0
    """Clip each member's global gradient norm to this value (0 = off)."""
    precision: Precision = "auto"
    """auto = bf16 on GPUs that support it, else fp32; bf16 and fp16 need a GPU."""
    kd_loss: KdLoss = "fused"
    """Implementation of the distillation loss: fused (both directions of a pair in one pass; Triton on CUDA) or
    reference (plain torch, for debugging)."""
    attention: Attention = "sdpa"
    """Attention of every member: sdpa (torch's scaled_dot_product_attention, which picks a flash or memory-efficient
    kernel on a GPU; pre-training blocks carry no padding mask, so the fastest applies) or eager (the plain matmul +
    softmax of transformers, for comparison)."""
    compile: bool = False
    """torch.compile each member's model (DeepSpeed's engine.compile: in place, checkpoint keys unchanged); the
    engines' backward and optimizer step stay eager. The first steps compile (tens of seconds per member on a CPU).
    Not with a zero3 template (its per-module hooks split the graph; measured slower) nor with HomoDistil pruning
    or sandwich training (masks swapped at run time)."""
    fused_optimizer: bool = True
    """Each member's AdamW as one fused kernel over all its tensors (torch's fused=True; GPU and CPU) instead of a loop
    of per-tensor kernels; the same update up to float rounding. A ZeRO-Offload template always uses DeepSpeed's CPU
    Adam, which is vectorised C++ either way."""
    log_every: int = 10
    """Write training scalars every N steps."""
    peak_tflops: float = 0.0
    """One device's dense peak TFLOP/s at the run's precision, for perf/mfu (docs/scaling.md). 0 = look the GPU up
    (A100, H100, H200, L40S, L4, ...); an unlisted GPU or the CPU: no perf/mfu."""
    eval_every: int = 50
    """Evaluate every N steps (and at the end; 0 = only at the end)."""


@dataclass(kw_only=True, slots=True)
class PretrainLoopConfig(LoopConfig):
    """The pre-training loop."""

    eval_batches: int = 20
    """Held-out micro-batches per evaluation and rank. 0 = the whole held-out split (every full micro-batch)."""


@dataclass(kw_only=True, slots=True)
class TaskConfig:
    """A sequence classification or regression task: a GLUE task from the hub, or local files."""

    glue: str = ""
    """A GLUE task loaded with `datasets`: cola sst2 mrpc qqp stsb mnli qnli rte wnli. Needs the hub, or the task in
    the local datasets cache; without either it stops at once. Empty: local files."""
    train_file: str = ""
    """Local training file (.tsv, .csv or .jsonl). Empty (and no `glue`): the SST-2 train split bundled in the
    package. `ctcd-ds evaluate` never reads it (the labels come from the model)."""
    dev_file: str = ""
    """Local dev file, same format. Empty (and no `glue`): the bundled SST-2 dev split (for `ctcd-ds evaluate` only
    when no test_file is given either)."""
    test_file: str = ""
    """Local labelled test file, same format: evaluated like the dev split, once at the end of fine-tuning (never during
    it) and by `ctcd-ds evaluate`. Empty: none."""
    text_columns: list[str] = field(default_factory=lambda: ["sentence"])
    """One column (single sentence) or two (sentence pairs) holding the text. Ignored for GLUE tasks (their own
    columns)."""
    label_column: str = "label"
    """Column holding the label. Ignored for GLUE tasks."""
    header: bool = True
    """Local TSV/CSV files start with a header row; if false, columns are named by 0-based index ("0", "1", ...)."""
    kind: TaskKind = "auto"
    """auto = regression for stsb, else classification."""
    max_train_examples: int = 0
    """Use only the first N training examples (0 = all)."""
    max_dev_examples: int = 0
    """Evaluate on only the first N dev (and test) examples (0 = all)."""
    seq_len: int = 128
    """Truncate each example (pair) to this many tokens."""


@dataclass(kw_only=True, slots=True)
class DeepSpeedConfig:
    """How each member is wrapped by DeepSpeed; per-run values come from the rest of this tree."""

    template: str = "zero2"
    """A ZeRO template shipped with the package (zero0, zero1, zero2, zero3, zero2_offload, zero3_offload) or a JSON
    path."""
    collective_timeout_s: int = 600
    """Seconds a collective (all-reduce, barrier) waits for the other ranks before the run fails: how fast a rank
    that died brings the others down (NCCL's own default is 10-30 minutes)."""


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """Joint checkpoints of all members."""

    every: int = 100
    """Save every N steps (and at the end; 0 = only at the end)."""
    at_end: bool = True
    """Save at the last step. false: a throwaway run (e.g. the points of `ctcd-ds scale`) saves only every N steps
    and when stopped by a signal."""
    keep_last: int = 2
    """Keep the newest K checkpoints, delete older ones (0 = keep all)."""
    resume: str = "auto"
    """auto (resume from the output dir's latest checkpoint if any) | never (fail if one exists) | a checkpoint dir."""
