"""Fine-tuning for sequence classification/regression through DeepSpeed engines (the shared loop),
optionally co-distilling members on their class logits; and evaluation of a fine-tuned model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification

from ctcd_ds import checkpoint, dist
from ctcd_ds.config import FinetuneConfig, MemberConfig, TaskConfig
from ctcd_ds.data import SharedLoader
from ctcd_ds.engines import Member
from ctcd_ds.loop import Prediction, TrainingLoop
from ctcd_ds.tasks import (
    Split,
    check_dev_labels,
    compute_metrics,
    label_set,
    load_glue,
    local_files,
    read_file,
    task_kind,
    task_metrics,
)
from ctcd_ds.tokenizer import load_tokenizer


class Classifier(nn.Module):
    """What each fine-tuning engine holds: a Hugging Face sequence classifier returning its logits."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, attention_mask=attention_mask).logits


def is_checkpoint_member(path: str) -> bool:
    """``runs/x/checkpoints/step_N/NAME``: a member's folder inside a joint checkpoint."""
    return checkpoint.is_checkpoint(Path(path).parent)


def load_splits(cfg: TaskConfig) -> tuple[Split, list[Split], list[str] | None]:
    """(train, dev splits, class names or None for regression), every dev label checked."""
    kind = task_kind(cfg)
    if cfg.glue:
        train, devs, labels = load_glue(cfg)
    else:
        train_file, dev_file = local_files(cfg)
        train = read_file(train_file, cfg, kind, "task.train_file")
        devs = [read_file(dev_file, cfg, kind, "task.dev_file")]
        labels = label_set(train) if kind == "classification" else None
        if labels is not None:
            check_dev_labels(devs[0], labels, dev_file)
    if cfg.max_train_examples:
        train = Split(train.name, train.texts[: cfg.max_train_examples], train.labels[: cfg.max_train_examples])
    if cfg.max_dev_examples:
        devs = [Split(d.name, d.texts[: cfg.max_dev_examples], d.labels[: cfg.max_dev_examples]) for d in devs]
    return train, devs, labels


def encode(split: Split, tokenizer, seq_len: int, labels: list[str] | None) -> datasets.Dataset:
    columns = list(zip(*split.texts))
    enc = tokenizer(*columns, truncation=True, max_length=seq_len)
    target = [labels.index(v) for v in split.labels] if labels is not None else [float(v) for v in split.labels]
    return datasets.Dataset.from_dict({"input_ids": enc["input_ids"], "label": target})


class PadCollator:
    """Pads a batch of rows to its longest example (no randomness: the generator is unused)."""

    def __init__(self, pad_id: int, regression: bool):
        self.pad_id, self.regression = pad_id, regression

    def __call__(self, rows: dict[str, list], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        ids = [torch.as_tensor(x) for x in rows["input_ids"]]
        input_ids = nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=self.pad_id)
        attention_mask = nn.utils.rnn.pad_sequence([torch.ones_like(x) for x in ids], batch_first=True, padding_value=0)
        dtype = torch.float32 if self.regression else torch.long
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": torch.as_tensor(rows["label"], dtype=dtype)}


@torch.no_grad()
def predict(forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], data: datasets.Dataset, collator: PadCollator, batch_size: int, device) -> tuple[np.ndarray, np.ndarray]:
    """(predictions, labels) over a whole split: class ids, or floats for regression."""
    preds, golds = [], []
    for start in range(0, len(data), batch_size):
        batch = collator(data[start : start + batch_size])
        logits = forward(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu()
        preds.append(logits.squeeze(-1) if collator.regression else logits.argmax(-1))
        golds.append(batch["labels"])
    return torch.cat(preds).numpy(), torch.cat(golds).numpy()


class FinetuneTrainer(TrainingLoop):
    """Fine-tunes every trainable member of a FinetuneConfig on one shared stream of task batches."""

    progress_label = "fine-tuning"

    def __init__(self, cfg: FinetuneConfig):
        super().__init__(cfg)
        self.model_dirs = self._model_dirs()
        self.tokenizer = load_tokenizer(next(iter(self.model_dirs.values())))
        self.kind = task_kind(cfg.task)
        train, devs, self.labels = load_splits(cfg.task)
        self.collator = PadCollator(self.tokenizer.pad_token_id, self.kind == "regression")
        with dist.rank0_first():
            train_ds = encode(train, self.tokenizer, cfg.task.seq_len, self.labels)
            self.devs = {d.name: encode(d, self.tokenizer, cfg.task.seq_len, self.labels) for d in devs}
        self.loader = SharedLoader(train_ds, self.collator, cfg.train.micro_batch_size, cfg.seed)
        self._build_members(self._module)
        self._start(cfg.train.micro_batch_size * cfg.train.grad_accum_steps * cfg.task.seq_len * dist.world_size())

    def _model_dirs(self) -> dict[str, str]:
        """Each member's pretrained directory; members inside a checkpoint are exported first."""
        from ctcd_ds.export import export_checkpoint

        dirs = {}
        for name, m in self.cfg.members.items():
            if is_checkpoint_member(m.model):
                out = self.out / "init"
                if dist.is_rank0():
                    export_checkpoint(Path(m.model).parent, out)
                dist.barrier()
                dirs[name] = str(out / Path(m.model).name)
            else:
                dirs[name] = m.model
        return dirs

    def _module(self, name: str, m: MemberConfig) -> Classifier:
        directory = self.model_dirs[name]
        hf_cfg = AutoConfig.from_pretrained(directory)
        if self.kind == "regression":
            extra: dict[str, Any] = {"num_labels": 1, "problem_type": "regression"}
        else:
            extra = {
                "num_labels": len(self.labels),
                "id2label": dict(enumerate(self.labels)),
                "label2id": {label: i for i, label in enumerate(self.labels)},
                "problem_type": "single_label_classification",
            }
        if not m.trainable:  # a fine-tuned teacher keeps its own head and label set
            assert hf_cfg.num_labels == extra["num_labels"], (name, hf_cfg.num_labels)
            extra = {}
        return Classifier(AutoModelForSequenceClassification.from_pretrained(directory, dtype=torch.float32, **extra))

    def _forward(self, m: Member, batch: dict[str, torch.Tensor]) -> Prediction:
        with torch.set_grad_enabled(m.trainable and torch.is_grad_enabled()):
            logits = m.engine(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))
        return Prediction(logits, batch["labels"].to(self.device))

    def task_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.kind == "regression":
            return F.mse_loss(logits.float().squeeze(-1), targets)
        return F.cross_entropy(logits.float(), targets)

    def evaluate(self) -> dict[str, float]:
        """Every member's metrics on every dev split (each rank evaluates the whole split)."""
        out = {}
        self.results: dict[str, dict[str, dict[str, float]]] = {}
        for name, m in self.members.items():
            m.engine.eval()
            self.results[name] = {}
            for split, data in self.devs.items():
                preds, golds = predict(m.engine, data, self.collator, self.cfg.train.micro_batch_size, self.device)
                metrics = compute_metrics(self.kind, preds, golds)
                self.results[name][split] = metrics
                prefix = f"eval/{name}" if len(self.devs) == 1 else f"eval/{name}/{split}"
                out |= {f"{prefix}/{k}": v for k, v in metrics.items()}
            if m.trainable:
                m.engine.train()
        return out

    def write_results(self) -> Path:
        if not hasattr(self, "results"):  # resumed at the last step: nothing was evaluated in this process
            self.evaluate()
        path = self.out / "results.json"
        if dist.is_rank0():
            main = task_metrics(self.cfg.task)[0]
            path.write_text(json.dumps({"task": self.cfg.task.glue or local_files(self.cfg.task)[0], "main_metric": main, "step": self.step, "members": self.results}, indent=2))
        return path


def evaluate_model(model_dir: str, task: TaskConfig, out: Path | None, batch_size: int = 64) -> dict[str, dict[str, float]]:
    """Metrics of a fine-tuned model directory on the task's dev split(s); also written to ``out``."""
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(model_dir)
    kind = task_kind(task)
    if (model.config.num_labels == 1) != (kind == "regression"):
        raise ValueError(f"--model={model_dir}: it has {model.config.num_labels} outputs but task.kind={kind}")
    _, devs, _ = load_splits(task)
    labels = None if kind == "regression" else [model.config.id2label[i] for i in range(model.config.num_labels)]
    collator = PadCollator(tokenizer.pad_token_id, kind == "regression")
    results = {}
    for dev in devs:
        if labels is not None:
            check_dev_labels(dev, labels, dev.name)
        forward = lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits  # noqa: E731
        preds, golds = predict(forward, encode(dev, tokenizer, task.seq_len, labels), collator, batch_size, torch.device("cpu"))
        results[dev.name] = compute_metrics(kind, preds, golds)
    if out is not None:
        Path(out).write_text(json.dumps({"model": model_dir, "task": task.glue or local_files(task)[1], "results": results}, indent=2))
    return results
