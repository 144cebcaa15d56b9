"""Data of sequence-level tasks: GLUE through ``datasets`` or local TSV/CSV/JSONL files, read into examples
with clear errors (file, line, column), encoded and padded into batches; and their metrics."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from torch import nn

from ctcd_ds.assets import BUNDLED_SST2
from ctcd_ds.config import TaskConfig
from ctcd_ds.errors import UserError


@dataclass(frozen=True, slots=True)
class GlueTask:
    text_columns: tuple[str, ...]
    kind: str
    metrics: tuple[str, ...]
    dev_splits: tuple[str, ...] = ("validation",)


GLUE: dict[str, GlueTask] = {
    "cola": GlueTask(("sentence",), "classification", ("mcc", "accuracy")),
    "sst2": GlueTask(("sentence",), "classification", ("accuracy",)),
    "mrpc": GlueTask(("sentence1", "sentence2"), "classification", ("accuracy", "f1")),
    "qqp": GlueTask(("question1", "question2"), "classification", ("accuracy", "f1")),
    "stsb": GlueTask(("sentence1", "sentence2"), "regression", ("pearson", "spearman")),
    "mnli": GlueTask(
        ("premise", "hypothesis"), "classification", ("accuracy",), ("validation_matched", "validation_mismatched")
    ),
    "qnli": GlueTask(("question", "sentence"), "classification", ("accuracy",)),
    "rte": GlueTask(("sentence1", "sentence2"), "classification", ("accuracy",)),
    "wnli": GlueTask(("sentence1", "sentence2"), "classification", ("accuracy",)),
}


@dataclass(slots=True)
class Split:
    """Texts (one tuple per example: 1 or 2 strings) and raw labels (strings or floats) of one file/split."""

    name: str
    texts: list[tuple[str, ...]]
    labels: list


def task_kind(cfg: TaskConfig) -> str:
    if cfg.kind != "auto":
        return cfg.kind
    return GLUE[cfg.glue].kind if cfg.glue else "classification"


def task_metrics(cfg: TaskConfig) -> tuple[str, ...]:
    """Metric names, main one first: GLUE's for a GLUE task; else by kind."""
    if cfg.glue:
        return GLUE[cfg.glue].metrics
    return ("pearson", "spearman", "mse") if task_kind(cfg) == "regression" else ("accuracy", "f1", "mcc")


def local_files(cfg: TaskConfig) -> tuple[str, str]:
    """(train file, dev file) after the bundled-SST-2 default."""
    if cfg.train_file or cfg.dev_file:
        return cfg.train_file, cfg.dev_file
    return str(BUNDLED_SST2 / "train.tsv"), str(BUNDLED_SST2 / "dev.tsv")


def _rows(path: Path, header: bool) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """(column names, [(line number, row)]) of a TSV/CSV/JSONL file."""
    if path.suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise UserError(f"{path}:{n}: not valid JSON: {exc}") from exc
                    rows.append(
                        (n, {k: "" if v is None else str(v) if not isinstance(v, str) else v for k, v in obj.items()})
                    )
        columns = list(rows[0][1]) if rows else []
        return columns, rows
    delimiter = "\t" if path.suffix == ".tsv" else ","
    with open(path, encoding="utf-8", newline="") as fh:
        lines = list(
            csv.reader(fh, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
        )
    lines = [(n, cells) for n, cells in enumerate(lines, 1) if any(c.strip() for c in cells)]
    if not lines:
        return [], []
    if header:
        columns = [c.strip() for c in lines[0][1]]
        body = lines[1:]
    else:
        columns = [str(i) for i in range(len(lines[0][1]))]
        body = lines
    for n, cells in body:
        # More cells than columns would shift the text into the label (zip drops the last ones); empty cells
        # after the last column (a trailing tab) shift nothing.
        if len(cells) > len(columns) and any(c.strip() for c in cells[len(columns) :]):
            raise UserError(
                f"{path}:{n}: the row has {len(cells)} columns, the {'header' if header else 'first row'} has "
                f"{len(columns)} (a stray tab or comma?)"
            )
    return columns, [(n, dict(zip(columns, cells))) for n, cells in body]


def read_file(path: str, cfg: TaskConfig, kind: str, flag: str) -> Split:
    """Read one local file into a Split; every problem names the file, line or column."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{flag}={path}: no such file")
    columns, rows = _rows(p, cfg.header)
    if not rows:
        raise UserError(f"{flag}={path}: the file has no examples (empty file)")
    for col in (*cfg.text_columns, cfg.label_column):
        if col not in columns:
            raise UserError(
                f"{flag}={path}: no column '{col}' (columns: {', '.join(columns)}); set task.text_columns / "
                "task.label_column"
            )
    texts, labels = [], []
    for n, row in rows:
        if any(row.get(c) is None for c in (*cfg.text_columns, cfg.label_column)):
            raise UserError(f"{path}:{n}: the row has fewer columns than the header")
        texts.append(tuple(row[c] for c in cfg.text_columns))
        raw = row[cfg.label_column].strip()
        if kind == "regression":
            try:
                labels.append(float(raw))
            except ValueError:
                raise UserError(
                    f"{path}:{n}: column '{cfg.label_column}' = {raw!r} is not a number (task.kind=regression)"
                ) from None
        else:
            labels.append(raw)
    return Split(p.name, texts, labels)


def label_set(train: Split) -> list[str]:
    """The classes, in a stable order (numerically if every label is an integer)."""
    values = set(train.labels)
    if all(v.lstrip("-").isdigit() for v in values):
        return sorted(values, key=int)
    return sorted(values)


def check_dev_labels(dev: Split, labels: list[str], path: str) -> None:
    known = set(labels)
    for i, label in enumerate(dev.labels):
        if label not in known:
            raise UserError(
                f"{path}: example {i + 1} has label {label!r}, which the training file never uses (labels: "
                f"{', '.join(labels)})"
            )


def load_glue(cfg: TaskConfig, cache_dir: str | None = None) -> tuple[Split, list[Split], list[str] | None]:
    """GLUE train split and dev split(s) through ``datasets`` (needs the hub)."""
    spec = GLUE[cfg.glue]
    raw = datasets.load_dataset("nyu-mll/glue", cfg.glue, cache_dir=cache_dir)

    def split(name: str) -> Split:
        ds = raw[name]
        labels = list(ds["label"]) if spec.kind == "regression" else [str(v) for v in ds["label"]]
        return Split(name, list(zip(*(ds[c] for c in spec.text_columns))), labels)

    names = raw["train"].features["label"].names if spec.kind == "classification" else None
    return split("train"), [split(s) for s in spec.dev_splits], ([str(i) for i in range(len(names))] if names else None)


def compute_metrics(kind: str, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Metrics of one split: classification predictions/labels are class ids, regression floats."""
    if kind == "regression":
        return {
            "pearson": float(pearsonr(predictions, labels)[0]),
            "spearman": float(spearmanr(predictions, labels)[0]),
            "mse": float(np.mean((predictions - labels) ** 2)),
        }
    binary = len(set(labels.tolist()) | set(predictions.tolist())) <= 2
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "f1": float(f1_score(labels, predictions, average="binary" if binary else "macro", zero_division=0)),
        "mcc": float(matthews_corrcoef(labels, predictions)),
    }


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
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": torch.as_tensor(rows["label"], dtype=dtype),
        }


@torch.no_grad()
def predict(
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    data: datasets.Dataset,
    collator: PadCollator,
    batch_size: int,
    device,
) -> tuple[np.ndarray, np.ndarray]:
    """(predictions, labels) over a whole split: class ids, or floats for regression."""
    preds, golds = [], []
    for start in range(0, len(data), batch_size):
        batch = collator(data[start : start + batch_size])
        logits = forward(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu()
        preds.append(logits.squeeze(-1) if collator.regression else logits.argmax(-1))
        golds.append(batch["labels"])
    return torch.cat(preds).numpy(), torch.cat(golds).numpy()


def head_settings(kind: str, labels: list[str] | None) -> dict[str, Any]:
    """The ``from_pretrained`` settings of a fresh classification/regression head."""
    if kind == "regression":
        return {"num_labels": 1, "problem_type": "regression"}
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
        "problem_type": "single_label_classification",
    }
