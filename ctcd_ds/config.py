"""The one typed config tree of a run.

Every setting lives here exactly once, with its docstring (the text ``ctcd-ds pretrain --help`` prints).
A run config is built from, in order: these defaults, a recipe file (``--config``: a name from
``ctcd_ds/recipes/`` or a YAML/JSON path), then ``--section.key=value`` overrides. ``validate``
collects every problem and raises one :class:`ConfigError` listing them all, before anything is
written. Each engine's DeepSpeed JSON is derived from this tree (``ctcd_ds.ds_config``).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PACKAGE_DIR = Path(__file__).resolve().parent
RECIPES_DIR = PACKAGE_DIR / "recipes"


class ConfigError(ValueError):
    """One or more user mistakes in a run config; ``problems`` holds one line per mistake."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(kw_only=True, slots=True)
class PruneConfig:
    """HomoDistil: prune this member structurally while it trains (BERT models, ZeRO stages 0-2)."""

    hidden_size: int = 0
    """Target hidden width; a multiple of the head size, and the pruned model keeps hidden_size / head size heads per layer. 0 = keep the width (with intermediate_size 0: no pruning)."""
    intermediate_size: int = 0
    """Target FFN neurons per layer. 0 = keep them."""
    start: float = 0.0
    """Fraction of train.steps at which pruning starts (importance is tracked from the first step)."""
    end: float = 0.7
    """Fraction of train.steps by which the target is reached, on a cubic schedule; the rest of the run trains the pruned shape."""
    every: int = 1
    """Prune every N steps between start and end."""
    ema: float = 0.85
    """Smoothing of the importance scores |theta * dL/dtheta| across steps (0 = the current step only)."""

    @property
    def enabled(self) -> bool:
        return self.hidden_size > 0 or self.intermediate_size > 0


@dataclass(kw_only=True, slots=True)
class MiniDiscConfig:
    """MiniDisc: start this member (a teacher assistant) as the best of several one-shot prunings of its `model`; or train it sandwich-style."""

    sparsities: list[float] = field(default_factory=list)
    """Width sparsities of the candidates, e.g. [0.25, 0.5, 0.75]: each keeps (1 - s) of the heads (so of the hidden width) and of the FFN neurons. Empty = off."""
    lam: float = 0.2
    """lambda in score = held-out MLM accuracy + lambda * s, with s the candidate's parameter sparsity; the best score wins."""
    batches: int = 4
    """Training micro-batches whose MLM-loss sensitivities |theta * dL/dtheta| rank the structures to prune."""
    sandwich: list[float] = field(default_factory=list)
    """Sandwich training of this member (e.g. the student): its incoming KD (and hidden-state) losses are averaged over the full model and weight-shared sub-networks at these width sparsities, e.g. [0.5]; each sub-network keeps the heads, FFN neurons and hidden dims most important by running |theta * dL/dtheta| (EMA 0.85). Empty = off."""


@dataclass(kw_only=True, slots=True)
class MemberConfig:
    """One model of the run: its architecture or weights, and its own optimizer."""

    model: str = "tiny-teacher"
    """A model preset (see `ctcd-ds presets`), a Hugging Face model directory with pretrained weights, or the name of another member: a copy of that member's model (its weights when that is a directory, as in HomoDistil and MiniDisc; a fresh init of the same preset otherwise)."""
    trainable: bool = True
    """Train this member. A frozen member (false) must be pretrained (`model` is a directory); it only teaches."""
    init_from: str = ""
    """Parameter remapping (DWT): initialise this preset member from a smaller pretrained model directory — embeddings, head and layers 1..k copied, the last layer repeated for the extra ones; hidden and FFN sizes must match. Empty: random init."""
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
    lr_schedule: str = "linear"
    """Learning-rate decay after warm-up: linear | cosine | constant."""
    prune: PruneConfig = field(default_factory=PruneConfig)
    """HomoDistil structured pruning of this member while it trains (off by default)."""
    minidisc: MiniDiscConfig = field(default_factory=MiniDiscConfig)
    """MiniDisc teacher-assistant selection, or sandwich training, of this member (off by default)."""


@dataclass(kw_only=True, slots=True)
class EdgeConfig:
    """A distillation edge: `source` teaches `target` at the masked positions."""

    source: str
    """Name of the teaching member (its predictions are detached)."""
    target: str
    """Name of the learning member; the edge's loss is added to this member's loss."""
    weight: float = 1.0
    """Weight of `tau^2 * KL(p_source || p_target)` in the target's loss (alpha / beta in CTCD); the start weight of a schedule."""
    temperature: float = 2.0
    """Softmax temperature tau of both distributions."""
    schedule: str = "constant"
    """How the weight moves from `weight` to `final_weight` over `schedule_steps`: constant | linear | cosine | step (jumps at step K)."""
    final_weight: float = 1.0
    """The weight after `schedule_steps` steps (not used by constant)."""
    schedule_steps: int = 0
    """K: the steps over which the weight decays (linear, cosine) or after which it switches (step)."""
    hidden_weight: float = 0.0
    """Weight of the MSE between the source's and the target's last hidden states at the masked positions (HomoDistil); needs equal hidden sizes; over the dims the target keeps when it is being pruned. 0 = off."""


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where the text comes from and how it becomes masked blocks."""

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
    num_workers: int = 0
    """DataLoader worker processes per rank."""


@dataclass(kw_only=True, slots=True)
class TokenizerConfig:
    """The one tokenizer every member shares."""

    path: str = ""
    """An existing tokenizer directory. Empty: a pretrained member's tokenizer if it has one, else train one."""
    vocab_size: int = 8192
    """Vocabulary size of a newly trained SentencePiece model (5 BERT special tokens included)."""
    model_type: str = "unigram"
    """SentencePiece model type of a newly trained tokenizer: unigram | bpe."""
    max_sentences: int = 200000
    """At most this many lines of the training corpus are fed to SentencePiece."""


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """The training loop."""

    steps: int = 250
    """Optimizer steps to train for (each step is `grad_accum_steps` micro-batches on every rank)."""
    micro_batch_size: int = 32
    """Blocks per micro-batch per rank; every member sees the same batch."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    grad_clip: float = 1.0
    """Clip each member's global gradient norm to this value (0 = off)."""
    precision: str = "auto"
    """fp32 | bf16 | fp16 | auto (bf16 on GPUs that support it, else fp32)."""
    kd_loss: str = "fused"
    """Implementation of the distillation loss: fused (both directions of a pair in one pass; Triton on CUDA) | reference (plain torch, for debugging)."""
    log_every: int = 10
    """Write training scalars every N steps."""
    eval_every: int = 50
    """Evaluate held-out MLM loss/perplexity every N steps (and at the end; 0 = only at the end)."""
    eval_batches: int = 20
    """Held-out micro-batches per evaluation and rank."""


@dataclass(kw_only=True, slots=True)
class DeepSpeedConfig:
    """How each member is wrapped by DeepSpeed; per-run values come from the rest of this tree."""

    template: str = "zero2"
    """A ZeRO template: a name from ds_configs/ (zero0, zero1, zero2, zero3, zero2_offload, zero3_offload) or a JSON path."""


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """Joint checkpoints of all members."""

    every: int = 100
    """Save every N steps (and at the end; 0 = only at the end)."""
    keep_last: int = 2
    """Keep the newest K checkpoints, delete older ones (0 = keep all)."""
    resume: str = "auto"
    """auto (resume from the output dir's latest checkpoint if any) | never (fail if one exists) | a checkpoint dir."""


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """A CTCD-style run: named members, distillation edges between them, and how to train them."""

    output_dir: str = "runs/ctcd-tiny"
    """Everything of the run goes here: tensorboard/, checkpoints/, export/, tokenizer/, metrics.jsonl."""
    seed: int = 42
    """Seed of model init, data order, masking and dropout."""
    members: dict[str, MemberConfig] = field(
        default_factory=lambda: {
            "teacher": MemberConfig(model="tiny-teacher"),
            "student": MemberConfig(model="tiny-student"),
        }
    )
    """The models, by name."""
    edges: list[EdgeConfig] = field(
        default_factory=lambda: [
            EdgeConfig(source="student", target="teacher"),
            EdgeConfig(source="teacher", target="student"),
        ]
    )
    """Distillation edges (empty = every member trains alone)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and held-out text."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """The shared tokenizer."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed engine settings."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    export: bool = True
    """Export every member as a Hugging Face model directory at the end."""

    def __post_init__(self) -> None:
        """A member whose `model` names another member is a copy of that member's model (resolved here, so
        the rest of the code and the saved config see the preset or directory itself)."""
        for name, m in self.members.items():
            chain = [name]
            while m.model in self.members:
                if m.model in chain:
                    cycle = " -> ".join([*chain, m.model])
                    raise ConfigError([f"members.{name}.model: the members copy each other's model in a cycle ({cycle}); give one of them a preset or a directory"])
                chain.append(m.model)
                m.model = self.members[m.model].model


# --------------------------------------------------------------------------------------------------
# docstrings


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a config dataclass."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = nxt.value.value.strip()
    return docs


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def options_help(root: type | None = None) -> list[tuple[str, str, str]]:
    """(flag, default, doc) for every setting, in tree order; member settings under `members.NAME.`."""
    rows: list[tuple[str, str, str]] = []

    def walk(cls: type, prefix: str, default_obj: Any) -> None:
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            value = getattr(default_obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(type(value), f"{prefix}{f.name}.", value)
            elif f.name == "members":
                rows.append((f"{prefix}members.NAME.*", "teacher, student", docs[f.name]))
                walk(MemberConfig, f"{prefix}members.NAME.", MemberConfig())
            elif f.name == "edges":
                rows.append((f"{prefix}edges", "student<->teacher", docs[f.name]))
                walk(EdgeConfig, f"{prefix}edges.I.", EdgeConfig(source="?", target="?"))
            else:
                rows.append((f"{prefix}{f.name}", json.dumps(value), docs.get(f.name, "")))

    root = root or RunConfig
    walk(root, "", root())
    return rows


# --------------------------------------------------------------------------------------------------
# building from dicts


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Turn a YAML/CLI value into ``tp``, or record a problem and return None."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {value!r}")
            return None
        return _build(tp, value, where, problems)
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping of names, got {value!r}")
            return {}
        items = {str(k): _coerce(v if v is not None else {}, val_tp, f"{where}.{k}", problems) for k, v in value.items()}
        return {k: v for k, v in items.items() if v is not None}
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if item_tp is str and isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {value!r}")
            return []
        items = [_coerce(v, item_tp, f"{where}.{i}", problems) for i, v in enumerate(value)]
        return [v for v in items if v is not None]
    if tp is bool:
        if isinstance(value, bool):
            return value
        problems.append(f"{where}: expected true or false, got {value!r}")
        return None
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        problems.append(f"{where}: expected an integer, got {value!r}")
        return None
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        problems.append(f"{where}: expected a number, got {value!r}")
        return None
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        problems.append(f"{where}: expected a string, got {value!r}")
        return None
    raise AssertionError(f"unsupported config type {tp} at {where}")


def _build(cls: type, data: dict[str, Any], where: str, problems: list[str]) -> Any:
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(f"{path}: unknown setting{hint}")
            continue
        value = _coerce(value, hints[key], path, problems)
        if value is not None:  # a bad value was reported; keep the default so checking can go on
            kwargs[key] = value
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    for name in missing:
        problems.append(f"{where}.{name}: required" if where else f"{name}: required")
    if missing:
        return None
    return cls(**kwargs)


def to_dict(cfg: Any) -> Any:
    """The config as plain YAML/JSON-able data (inverse of :func:`from_dict`)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, list):
        return [to_dict(v) for v in cfg]
    return cfg


def from_dict(data: dict[str, Any], problems: list[str] | None = None, root: type | None = None) -> Any:
    """Build a RunConfig (or another ``root`` config class) from nested data.

    Unknown keys and wrong types raise one ConfigError; if a ``problems`` list is given they are
    appended to it instead and the offending values keep their defaults, so that validation can
    report them together with everything else.
    """
    collect: list[str] = [] if problems is None else problems
    cfg = _build(root or RunConfig, data, "", collect)
    if problems is None and collect:
        raise ConfigError(collect)
    return cfg


# --------------------------------------------------------------------------------------------------
# recipe files and overrides


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def resolve_recipe(name_or_path: str) -> Path:
    """A recipe name (``ctcd``) or a YAML/JSON path -> the file."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    packaged = RECIPES_DIR / f"{name_or_path}.yaml"
    if packaged.is_file():
        return packaged
    raise ConfigError([f"--config={name_or_path}: no such file and no recipe of that name (recipes: {', '.join(recipe_names())})"])


def load_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError([f"--config={path}: cannot read it: {exc}"]) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"--config={path}: expected a mapping at the top, got {type(data).__name__}"])
    return data


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """``--a.b=v``, ``--a.b v`` or ``a.b=v`` -> [("a.b", parsed v)]; values are parsed as YAML."""
    out: list[tuple[str, Any]] = []
    problems: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        key, value = None, None
        if arg.startswith("--"):
            body = arg[2:]
            if "=" in body:
                key, value = body.split("=", 1)
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                key, value = body, args[i + 1]
                i += 1
            else:
                problems.append(f"{arg}: needs a value (--{body}=VALUE)")
        elif "=" in arg:
            key, value = arg.split("=", 1)
        else:
            problems.append(f"{arg}: not an override; use --section.key=value")
        if key is not None:
            try:
                parsed = yaml.safe_load(value) if value != "" else ""
            except yaml.YAMLError:
                parsed = value
            out.append((key, parsed))
        i += 1
    if problems:
        raise ConfigError(problems)
    return out


def apply_override(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data[a][b]... = value`` for the dotted key, creating mappings (and list items by index)."""
    parts = key.split(".")
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        nxt_is_index = parts[depth + 1].isdigit()
        if isinstance(node, list):
            idx = int(part)
            if idx >= len(node):
                raise ConfigError([f"--{key}: list index {idx} out of range (it has {len(node)} items)"])
            node = node[idx]
            continue
        if part not in node or node[part] is None:
            node[part] = [] if nxt_is_index else {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        idx = int(last)
        if idx >= len(node):
            raise ConfigError([f"--{key}: list index {idx} out of range (it has {len(node)} items)"])
        node[idx] = value
    else:
        node[last] = value


def load_config(
    config: str | None = None, overrides: list[str] | None = None, problems: list[str] | None = None, root: type | None = None
) -> Any:
    """Defaults <- recipe file <- overrides, then build (types checked, unknown keys rejected;
    see :func:`from_dict` for ``problems``)."""
    root = root or RunConfig
    data: dict[str, Any] = to_dict(root())
    if config:
        recipe = load_file(resolve_recipe(config))
        # members and edges in a recipe replace the defaults; other sections merge key by key.
        for key, value in recipe.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict) and key != "members":
                data[key].update(value)
            else:
                data[key] = value
    for key, value in parse_overrides(overrides or []):
        apply_override(data, key, value)
    return from_dict(data, problems, root)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# --------------------------------------------------------------------------------------------------
# fine-tuning (ctcd-ds finetune / evaluate)


@dataclass(kw_only=True, slots=True)
class TaskConfig:
    """A sequence classification or regression task: a GLUE task from the hub, or local files."""

    glue: str = ""
    """A GLUE task loaded with `datasets` (needs the hub): cola sst2 mrpc qqp stsb mnli qnli rte wnli. Empty: local files."""
    train_file: str = ""
    """Local training file (.tsv, .csv or .jsonl). Empty (and no `glue`): the SST-2 train split bundled in the package."""
    dev_file: str = ""
    """Local dev file, same format. Empty (and no `glue`): the bundled SST-2 dev split."""
    text_columns: list[str] = field(default_factory=lambda: ["sentence"])
    """One column (single sentence) or two (sentence pairs) holding the text. Ignored for GLUE tasks (their own columns)."""
    label_column: str = "label"
    """Column holding the label. Ignored for GLUE tasks."""
    header: bool = True
    """Local TSV/CSV files start with a header row; if false, columns are named by 0-based index ("0", "1", ...)."""
    kind: str = "auto"
    """classification | regression | auto (regression for stsb, else classification)."""
    max_train_examples: int = 0
    """Use only the first N training examples (0 = all)."""
    max_dev_examples: int = 0
    """Evaluate on only the first N dev examples (0 = all)."""
    seq_len: int = 128
    """Truncate each example (pair) to this many tokens."""


@dataclass(kw_only=True, slots=True)
class FinetuneTrainConfig:
    """The fine-tuning loop."""

    steps: int = 500
    """Optimizer steps."""
    micro_batch_size: int = 32
    """Examples per micro-batch per rank; co-distilled members see the same batch."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    grad_clip: float = 1.0
    """Clip each member's global gradient norm to this value (0 = off)."""
    precision: str = "auto"
    """fp32 | bf16 | fp16 | auto (bf16 on GPUs that support it, else fp32)."""
    kd_loss: str = "fused"
    """Implementation of the distillation loss on class logits: fused | reference (plain torch, for debugging)."""
    log_every: int = 10
    """Write training scalars every N steps."""
    eval_every: int = 0
    """Evaluate on the dev set every N steps (and at the end; 0 = only at the end)."""


def _finetune_members() -> dict[str, MemberConfig]:
    return {"model": MemberConfig(model="runs/ctcd-tiny/export/student", lr=1e-4, warmup_ratio=0.1)}


@dataclass(kw_only=True, slots=True)
class FinetuneConfig:
    """Fine-tune pretrained members on a task, alone or co-distilling through edges on class logits."""

    output_dir: str = "runs/finetune"
    """Everything of the run goes here: tensorboard/, checkpoints/, export/, results.json, metrics.jsonl."""
    seed: int = 42
    """Seed of the head init, data order and dropout."""
    members: dict[str, MemberConfig] = field(default_factory=_finetune_members)
    """The models to fine-tune, by name: `model` is an exported directory or a member's folder inside a checkpoint (checkpoints/step_N/NAME)."""
    edges: list[EdgeConfig] = field(default_factory=list)
    """Co-distillation edges between members, on the class logits (classification only)."""
    task: TaskConfig = field(default_factory=TaskConfig)
    """The task and its data."""
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    """The training loop."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed engine settings."""
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=0, keep_last=1))
    """Checkpointing."""
    export: bool = True
    """Export every fine-tuned member as a Hugging Face directory at the end."""


# --------------------------------------------------------------------------------------------------
# the reproduction experiment (ctcd-ds experiment / launchers/reproduce.sh)


@dataclass(kw_only=True, slots=True)
class ExperimentConfig:
    """Pre-train standalone / one-way KD / CTCD / Community KD on the same data, steps, batch and seed,
    fine-tune every resulting model on a task over several seeds, and tabulate and plot the results."""

    output_dir: str = "runs/experiment"
    """Each stage writes below it (pretrain/VARIANT, finetune/MODEL-seedS); results.md, results.json and results.png at the top. Finished stages are skipped when run again."""
    scale: str = "tiny"
    """tiny (the CPU pair, 4L-256 and 2L-128) | paper (6L-768 and 4L-768, for GPUs)."""
    quick: bool = False
    """A smoke run of tens of steps (what the tests run): overrides the step counts and example limits below."""
    pretrain_steps: int = 1000
    """Pre-training steps of every variant."""
    pretrain_batch: int = 32
    """Pre-training micro-batch (blocks per rank)."""
    pretrain_lr: float = 1e-3
    """Peak learning rate of every member trained in pre-training."""
    variants: list[str] = field(default_factory=lambda: ["standalone", "kd", "ctcd", "community_kd"])
    """Pre-training variants to run: standalone (the pair with no edges; its teacher is the KD and Community KD teacher), kd, ctcd, community_kd."""
    temperature: float = 2.0
    """tau of every distillation edge."""
    alpha: float = 1.0
    """CTCD weight of student -> teacher (the start weight when alpha_schedule is not constant)."""
    alpha_schedule: str = "constant"
    """How the CTCD student -> teacher weight moves from alpha to alpha_final over the pre-training steps: constant | linear | cosine | step."""
    alpha_final: float = 0.0
    """The student -> teacher weight at the end of pre-training (not used by constant)."""
    beta: float = 1.0
    """CTCD (and KD, Community KD) weight of teacher -> student."""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """Fine-tuning seeds of every model."""
    finetune_steps: int = 200
    """Fine-tuning steps of every model and seed."""
    finetune_lr: float = 3e-4
    """Fine-tuning peak learning rate."""
    task: TaskConfig = field(default_factory=lambda: TaskConfig(max_train_examples=16000, max_dev_examples=2000, seq_len=64))
    """The fine-tuning task (default: the bundled SST-2, its first 16000 training and 2000 dev sentences)."""
