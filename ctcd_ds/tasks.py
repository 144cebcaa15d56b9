"""Tasks: what a batch is, what each member predicts for it, its task loss, and how members are evaluated.

A task is built from a run config before anything is written (tokenizer, data, shared loader) and then
serves the trainer and the co-training step through one small interface (:class:`Task`):

- :class:`MaskedLM` (``ctcd-ds pretrain``): MLM cross-entropy at the masked positions; members are BERT
  masked LMs (presets or directories), optionally remapped, pruned while training, or chosen by MiniDisc.
- :class:`Classification` (``ctcd-ds finetune``): cross-entropy (or MSE for regression) on sequence labels;
  members are Hugging Face sequence classifiers built from pretrained directories.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedTokenizerBase

from ctcd_ds import dist
from ctcd_ds.config import FinetuneConfig, MemberConfig, PretrainConfig, PretrainMemberConfig, TaskConfig
from ctcd_ds.data import MaskingCollator, SharedLoader, eval_batches, load_blocks, run_tokenizer
from ctcd_ds.engines import Member
from ctcd_ds.errors import UserError
from ctcd_ds.export import export_checkpoint
from ctcd_ds.layout import is_checkpoint_member
from ctcd_ds.models import SparseMLM, build_model, parameters_of, remap_init
from ctcd_ds.pruning import minidisc
from ctcd_ds.pruning.training import SANDWICH_EMA, Pruner, Sandwich
from ctcd_ds.pruning.widths import target_widths, widths_of
from ctcd_ds.task_data import (
    PadCollator,
    Predictions,
    compute_metrics,
    encode,
    head_settings,
    load_eval_splits,
    load_splits,
    local_files,
    majority_baseline,
    predict,
    predictions_file,
    task_kind,
    task_metrics,
    write_predictions,
)
from ctcd_ds.tokenizer import load_tokenizer


class Prediction(NamedTuple):
    """What one member predicts for a batch: what the task loss and the edge losses read."""

    logits: torch.Tensor
    """[rows, classes]: at the masked positions (MLM) or per example (classification)."""
    targets: torch.Tensor
    """[rows]: the true tokens or labels."""
    hidden: torch.Tensor | None = None
    """[rows, hidden] last hidden states at the same rows (MLM), for hidden-state MSE edges."""
    hidden_keep: torch.Tensor | None = None
    """bool [hidden]: the hidden dims the member keeps while it is being pruned (None: all)."""


class Task(Protocol):
    loss_name: str
    """The task loss's name in the logged scalars (``NAME/mlm_loss``)."""
    progress_label: str
    tokenizer: PreTrainedTokenizerBase
    loader: SharedLoader
    """The one loader every member reads."""
    tokens_per_micro_batch: int
    """Tokens in one rank's micro-batch (for throughput)."""

    def build_module(self, name: str, m: MemberConfig, recorded: dict[str, Any] | None) -> nn.Module:
        """The module member ``name``'s engine wraps (it holds the Hugging Face model as ``.hf``);
        ``recorded``: what :meth:`state` saved for it in the checkpoint being resumed, if any."""

    def forward(self, member: Member, batch: dict[str, torch.Tensor], view: float = 0.0) -> Prediction: ...

    def loss(self, prediction: Prediction) -> torch.Tensor: ...

    def evaluate(self, members: dict[str, Member]) -> dict[str, float]:
        """Scalars to log (``eval/NAME/metric``), over every rank's share."""

    def state(self) -> dict[str, Any]:
        """What a checkpoint must record to rebuild the members' modules (shapes chosen at run time, labels)."""


def _set_grad(member: Member):
    return torch.set_grad_enabled(member.trainable and torch.is_grad_enabled())


# --------------------------------------------------------------------------------------------------
# masked LM (pre-training)


class MaskedLM:
    """Masked-LM co-training on one shared stream of masked blocks."""

    loss_name = "mlm_loss"
    progress_label = "co-training"

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        self.device = dist.device()
        self.tokenizer = run_tokenizer(cfg)
        train_blocks, eval_blocks = load_blocks(cfg.data, self.tokenizer, cfg.seed)
        collator = MaskingCollator(self.tokenizer, cfg.data.mlm_probability)
        self.loader = SharedLoader(
            train_blocks, collator, cfg.train.micro_batch_size, cfg.seed, num_workers=cfg.data.num_workers
        )
        self.eval_batches = eval_batches(
            eval_blocks, collator, cfg.train.micro_batch_size, cfg.train.eval_batches, cfg.seed
        )
        self.tokens_per_micro_batch = cfg.train.micro_batch_size * cfg.data.seq_len
        self.minidisc_choices: dict[str, dict[str, int]] = {}
        self.minidisc_tables: list[tuple] = []  # (member, candidates, best, lambda, reference) per choice

    def build_module(self, name: str, m: PretrainMemberConfig, recorded: dict[str, Any] | None) -> SparseMLM:
        model = build_model(m.model, len(self.tokenizer), self.tokenizer.pad_token_id)
        if m.init_from:
            mapping = remap_init(model, m.init_from)
            dist.print0(f"{name}: layers initialised from {m.init_from} layers {[i + 1 for i in mapping]}")
        if m.minidisc.sparsities:
            model = self._minidisc(name, m, model, recorded)
        structure = None
        if m.prune.enabled:
            config = model.config
            target = target_widths(
                config, m.prune.hidden_size or config.hidden_size, m.prune.intermediate_size or config.intermediate_size
            )
            steps = self.cfg.train.steps
            start, end = round(m.prune.start * steps), round(m.prune.end * steps)
            structure = Pruner(model, target, start, end, m.prune.every, m.prune.ema)
            dist.print0(f"{name}: pruned while training from {widths_of(config)} to {target} (steps {start}-{end})")
        elif m.minidisc.sandwich:
            structure = Sandwich(model, SANDWICH_EMA)
            dist.print0(f"{name}: sandwich training with sub-networks at width sparsities {m.minidisc.sandwich}")
        return SparseMLM(model, structure)

    def _minidisc(self, name: str, m: PretrainMemberConfig, model, recorded: dict[str, Any] | None):
        """MiniDisc: the best one-shot pruning of ``model``; a resumed run rebuilds the shape its checkpoint
        recorded (the weights come from the checkpoint)."""
        if recorded is not None:
            self.minidisc_choices[name] = recorded["minidisc"]
            chosen = minidisc.rebuild_choice(model, recorded["minidisc"])
            dist.print0(
                f"{name}: the teacher assistant chosen earlier ({widths_of(chosen.config)}), from the checkpoint"
            )
            return chosen
        loader = SharedLoader(self.loader.dataset, self.loader.collator, self.loader.batch_size, self.cfg.seed + 17)
        batches = iter(loader)
        score_batches = [next(batches) for _ in range(m.minidisc.batches)]
        chosen, candidates, best, reference = minidisc.select(
            model,
            m.minidisc,
            score_batches,
            self.eval_batches,
            self.device,
            student=self._largest_taught(name),
            flag=f"members.{name}.minidisc",
        )
        dist.print0(minidisc.table(candidates, best, m.minidisc.lam, reference))
        self.minidisc_tables.append((name, candidates, best, m.minidisc.lam, reference))
        self.minidisc_choices[name] = minidisc.choice_of(candidates[best])
        return chosen

    def _largest_taught(self, name: str) -> tuple[str, int]:
        """(name, parameters) of the largest member ``name`` teaches through an edge; ("", 0) if none."""
        taught = {e.target for e in self.cfg.edges if e.source == name and e.target in self.cfg.members}
        sizes = {
            t: parameters_of(self.cfg.members[t].model, len(self.tokenizer), self.tokenizer.pad_token_id)
            for t in taught
        }
        return max(sizes.items(), key=lambda kv: kv[1], default=("", 0))

    def state(self) -> dict[str, Any]:
        return {name: {"minidisc": choice} for name, choice in self.minidisc_choices.items()}

    def write_outputs(self, out: Path) -> None:
        """Rank 0, once the run starts writing: the MiniDisc candidate tables, if any were made."""
        for table in self.minidisc_tables:
            minidisc.write_table(out, *table)

    def forward(self, member: Member, batch: dict[str, torch.Tensor], view: float = 0.0) -> Prediction:
        """Logits and hidden states of one member (or its sandwich sub-network ``view``) at the batch's masked
        positions, and the true tokens there."""
        ids, mask, predict, targets = _on_device(batch, self.device)
        with _set_grad(member):
            logits, hidden = member.engine(ids, mask, predict, view)
        return Prediction(logits, targets, hidden, member.engine.module.hidden_keep(view))

    def loss(self, prediction: Prediction) -> torch.Tensor:
        return F.cross_entropy(prediction.logits.float(), prediction.targets)

    @torch.no_grad()
    def evaluate(self, members: dict[str, Member]) -> dict[str, float]:
        """Held-out MLM loss, perplexity and accuracy of every member (summed over ranks)."""
        out = {}
        for name, m in members.items():
            m.engine.eval()
            sums = torch.zeros(3, dtype=torch.float64)
            for batch in self.eval_batches:
                logits, targets, *_ = self.forward(m, batch)
                loss_sum = F.cross_entropy(logits.float(), targets, reduction="sum").item()
                correct = (logits.argmax(-1) == targets).sum().item()
                sums += torch.tensor([loss_sum, correct, targets.numel()], dtype=torch.float64)
            loss_sum, correct, count = dist.all_reduce_sum(sums).tolist()
            if m.trainable:
                m.engine.train()
            loss = loss_sum / max(count, 1)
            out |= {
                f"eval/{name}/mlm_loss": loss,
                f"eval/{name}/perplexity": float(np.exp(min(loss, 50))),
                f"eval/{name}/accuracy": correct / max(count, 1),
            }
        return out


def _on_device(batch: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, ...]:
    """A masked batch as the model takes it: (input ids, attention mask or None when no row is padded, flat indices
    of the positions to predict, their true tokens), on ``device``.

    Which positions to predict, and whether there is padding, is decided here on the host, where the loader left
    the batch: on a GPU, boolean indexing or an all-ones test of device tensors would make the host wait for
    the device at every forward (the copies: ``non_blocking``; the loader's tensors are page-locked on a GPU, the
    two index tensors made here are staged by the driver). Without a mask, scaled-dot-product attention may take
    its fastest kernel."""
    labels = batch["labels"].flatten()
    predict = (labels != -100).nonzero().squeeze(1)
    mask = batch["attention_mask"]
    tensors = (batch["input_ids"], None if bool(mask.all()) else mask, predict, labels[predict])
    return tuple(t.to(device, non_blocking=True) if t is not None else None for t in tensors)


# --------------------------------------------------------------------------------------------------
# sequence classification / regression (fine-tuning)


class Classifier(nn.Module):
    """What each fine-tuning engine holds: a Hugging Face sequence classifier returning its logits."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, attention_mask=attention_mask).logits


class Classification:
    """Fine-tuning every member on one shared stream of task batches (co-distilling on class logits)."""

    loss_name = "task_loss"
    progress_label = "fine-tuning"

    def __init__(self, cfg: FinetuneConfig, out: Path):
        self.cfg = cfg
        self.device = dist.device()
        self.model_dirs = self._model_dirs(out)
        self.tokenizer = load_tokenizer(next(iter(self.model_dirs.values())))
        self.kind = task_kind(cfg.task)
        train, self.splits, self.labels = load_splits(cfg.task)
        self.train_source = train.source
        self.collator = PadCollator(self.tokenizer.pad_token_id, self.kind == "regression")
        with dist.rank0_first():
            train_ds = encode(train, self.tokenizer, cfg.task.seq_len, self.labels)
            encoded = {s.name: encode(s, self.tokenizer, cfg.task.seq_len, self.labels) for s in self.splits}
        self.devs = {s.name: encoded[s.name] for s in self.splits if s.role == "dev"}
        self.tests = {s.name: encoded[s.name] for s in self.splits if s.role == "test"}
        """Evaluated once, at the end (:meth:`write_results`): never seen while training or choosing."""
        self.baseline = majority_baseline(train, self.splits, self.labels) if self.labels else None
        self.loader = SharedLoader(train_ds, self.collator, cfg.train.micro_batch_size, cfg.seed)
        self.tokens_per_micro_batch = cfg.train.micro_batch_size * cfg.task.seq_len
        self.results: dict[str, dict[str, dict[str, float]]] = {}
        self.predictions: dict[str, dict[str, Predictions]] = {}
        """The latest predictions of every member on every split (written at the end)."""
        self.members: dict[str, Member] = {}

    def _model_dirs(self, out: Path) -> dict[str, str]:
        """Each member's pretrained directory; members inside a checkpoint are exported first (to ``out/init``)."""
        dirs = {}
        for name, m in self.cfg.members.items():
            if is_checkpoint_member(m.model):
                init = out / "init"
                if dist.is_rank0():
                    export_checkpoint(Path(m.model).parent, init)
                dist.barrier()
                dirs[name] = str(init / Path(m.model).name)
            else:
                dirs[name] = m.model
        return dirs

    def build_module(self, name: str, m: MemberConfig, recorded: dict[str, Any] | None) -> Classifier:
        directory = self.model_dirs[name]
        extra = head_settings(self.kind, self.labels)
        if not m.trainable:  # a fine-tuned teacher keeps its own head and label set
            num_labels = AutoConfig.from_pretrained(directory).num_labels
            if num_labels != extra["num_labels"]:
                raise UserError(
                    f"members.{name}.model={m.model}: the frozen classifier has {num_labels} outputs, "
                    f"the task has {extra['num_labels']}"
                )
            extra = {}
        hf = AutoModelForSequenceClassification.from_pretrained(directory, dtype=torch.float32, **extra)
        return Classifier(hf)

    def state(self) -> dict[str, Any]:
        return {name: {"model_dir": d, "kind": self.kind, "labels": self.labels} for name, d in self.model_dirs.items()}

    def write_outputs(self, out: Path) -> None:
        pass

    def forward(self, member: Member, batch: dict[str, torch.Tensor], view: float = 0.0) -> Prediction:
        assert view == 0.0, "sandwich views are a pre-training feature"
        ids, mask, labels = (
            batch[k].to(self.device, non_blocking=True) for k in ("input_ids", "attention_mask", "labels")
        )
        with _set_grad(member):
            logits = member.engine(ids, mask)
        return Prediction(logits, labels)

    def loss(self, prediction: Prediction) -> torch.Tensor:
        if self.kind == "regression":
            return F.mse_loss(prediction.logits.float().squeeze(-1), prediction.targets)
        return F.cross_entropy(prediction.logits.float(), prediction.targets)

    def _evaluate_split(self, name: str, m: Member, split: str, data) -> dict[str, float]:
        result = predict(m.engine, data, self.collator, self.cfg.train.micro_batch_size, self.device)
        metrics = compute_metrics(self.kind, result.predictions, result.labels, len(self.labels or []))
        self.results.setdefault(name, {})[split] = metrics
        self.predictions.setdefault(name, {})[split] = result
        return metrics

    def evaluate(self, members: dict[str, Member]) -> dict[str, float]:
        """Every member's metrics on every dev split (each rank evaluates the whole split); not the test split."""
        self.members = members
        out = {}
        for name, m in members.items():
            m.engine.eval()
            self.results[name] = {}
            for split, data in self.devs.items():
                metrics = self._evaluate_split(name, m, split, data)
                prefix = f"eval/{name}" if len(self.devs) == 1 else f"eval/{name}/{split}"
                out |= {f"{prefix}/{k}": v for k, v in metrics.items()}
            if m.trainable:
                m.engine.train()
        return out

    def write_results(self, out: Path, step: int) -> Path:
        """At the end of the run (after the last :meth:`evaluate`): evaluate the test split (every rank: it is a
        forward of the engines), then rank 0 writes ``results.json`` (every member's dev and test metrics, the
        files they came from, the majority-class baseline) and every member's per-example predictions."""
        for name, m in self.members.items():
            m.engine.eval()
            for split, data in self.tests.items():
                self._evaluate_split(name, m, split, data)
        path = out / "results.json"
        if dist.is_rank0():
            t = self.cfg.task
            files = {}
            for name in self.predictions:
                for s in self.splits:
                    target = out / "predictions" / name / predictions_file(s, self.splits)
                    write_predictions(target, s, self.predictions[name][s.name], self.labels)
                    files.setdefault(name, {})[s.name] = str(target)
            results = {
                "task": t.glue or local_files(t)[0],
                "main_metric": task_metrics(t)[0],
                "step": step,
                "train_file": self.train_source,
                "splits": {s.name: {"role": s.role, "file": s.source, "examples": len(s.labels)} for s in self.splits},
                "members": self.results,
                "majority_baseline": self.baseline,
                "predictions": files,
            }
            path.write_text(json.dumps(results, indent=2))
        return path


def model_task_kind(model_dir: str, config, task: TaskConfig) -> str:
    """The task kind of a fine-tuned model: ``task.kind`` if set (checked against the head), else its head's (one
    output or ``problem_type`` regression: regression)."""
    regression = config.num_labels == 1 or config.problem_type == "regression"
    kind = task.kind if task.kind != "auto" else ("regression" if regression else "classification")
    if task.kind == "auto" and task.glue:
        kind = task_kind(task)
    if regression != (kind == "regression"):
        raise UserError(f"--model={model_dir}: it has {config.num_labels} outputs but task.kind={kind}")
    return kind


def evaluate_model(model_dir: str, task: TaskConfig, out: Path | None, batch_size: int = 64) -> dict[str, Any]:
    """Metrics of a fine-tuned model directory on the task's dev and test splits, and the files they came from;
    written to ``out`` with, next to it, one ``predictions_<split>.jsonl`` per split. The label set is the model's
    (``id2label``): no training file is read."""
    if not (Path(model_dir) / "config.json").is_file():
        raise UserError(f"--model={model_dir}: not a model directory (no config.json); give export/NAME of a run")
    config = AutoConfig.from_pretrained(model_dir)
    if not any(a.endswith("ForSequenceClassification") for a in (config.architectures or [])):
        raise UserError(
            f"--model={model_dir}: not a fine-tuned classifier ({', '.join(config.architectures or ['?'])}); "
            "fine-tune it first (ctcd-ds finetune)"
        )
    kind = model_task_kind(model_dir, config, task)
    labels = None if kind == "regression" else [str(config.id2label[i]) for i in range(config.num_labels)]
    splits = load_eval_splits(task, kind, labels, f"the model does not know (--model={model_dir})")
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(model_dir)
    collator = PadCollator(tokenizer.pad_token_id, kind == "regression")

    def forward(ids, mask):
        return model(input_ids=ids, attention_mask=mask).logits

    results, predictions = {}, {}
    for split in splits:
        data = encode(split, tokenizer, task.seq_len, labels)
        predictions[split.name] = predict(forward, data, collator, batch_size, torch.device("cpu"))
        result = predictions[split.name]
        results[split.name] = compute_metrics(kind, result.predictions, result.labels, len(labels or []))
    report = {
        "model": model_dir,
        "task": task.glue or splits[0].source,
        "splits": {s.name: {"role": s.role, "file": s.source, "examples": len(s.labels)} for s in splits},
        "results": results,
        "predictions": {},
    }
    if out is not None:
        out = Path(out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            for s in splits:
                path = write_predictions(out.parent / predictions_file(s, splits), s, predictions[s.name], labels)
                report["predictions"][s.name] = str(path)
            out.write_text(json.dumps(report, indent=2))
        except OSError as exc:
            raise UserError(f"--out={out}: cannot write the results there: {exc.strerror or exc}") from exc
    return report
