"""Data of sequence-level tasks: GLUE through ``datasets`` or local TSV/CSV/JSONL files, read into examples
with clear errors (file, line, column), encoded and padded into batches; their metrics, the majority-class
baseline, and per-example prediction files."""

from __future__ import annotations

import contextlib
import csv
import glob
import json
import os
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlparse

import datasets
import huggingface_hub.constants
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


GLUE_REPO = "nyu-mll/glue"
HUB_TIMEOUT_S = 5.0
"""How long `task.glue` waits for a TCP connection to the hub before it gives up (when the task is not cached)."""


@dataclass(slots=True)
class Split:
    """Texts (one tuple per example: 1 or 2 strings) and raw labels (strings or floats) of one file/split."""

    name: str
    texts: list[tuple[str, ...]]
    labels: list
    role: str = "dev"
    """train, dev or test."""
    source: str = ""
    """Where it was read: the file's path, or `glue:TASK/SPLIT`."""

    def head(self, n: int) -> Split:
        """The first ``n`` examples (all when ``n`` is 0)."""
        if not n:
            return self
        return Split(self.name, self.texts[:n], self.labels[:n], self.role, self.source)


def task_kind(cfg: TaskConfig) -> str:
    if cfg.kind != "auto":
        return cfg.kind
    return GLUE[cfg.glue].kind if cfg.glue else "classification"


def task_metrics(cfg: TaskConfig) -> tuple[str, ...]:
    """Metric names, main one first: GLUE's for a GLUE task; else by kind."""
    if cfg.glue:
        return GLUE[cfg.glue].metrics
    return ("pearson", "spearman", "mse") if task_kind(cfg) == "regression" else ("accuracy", "macro_f1", "mcc")


def local_files(cfg: TaskConfig) -> tuple[str, str]:
    """(train file, dev file) after the bundled-SST-2 default."""
    if cfg.train_file or cfg.dev_file:
        return cfg.train_file, cfg.dev_file
    return str(BUNDLED_SST2 / "train.tsv"), str(BUNDLED_SST2 / "dev.tsv")


def eval_files(cfg: TaskConfig) -> list[tuple[str, str]]:
    """[(role, file)] that `ctcd-ds evaluate` reads: the dev file and the test file that are given; with neither
    (and no train file), the bundled SST-2 dev split. The training file is never among them."""
    files = [(role, f) for role, f in (("dev", cfg.dev_file), ("test", cfg.test_file)) if f]
    if not files and not cfg.train_file:
        files = [("dev", str(BUNDLED_SST2 / "dev.tsv"))]
    return files


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
    return Split(p.name, texts, labels, source=path)


def label_set(train: Split) -> list[str]:
    """The classes, in a stable order (numerically if every label is an integer)."""
    values = set(train.labels)
    if all(v.lstrip("-").isdigit() for v in values):
        return sorted(values, key=int)
    return sorted(values)


def check_dev_labels(dev: Split, labels: list[str], path: str, known_by: str = "the training file never uses") -> None:
    known = set(labels)
    for i, label in enumerate(dev.labels):
        if label not in known:
            raise UserError(
                f"{path}: example {i + 1} has label {label!r}, which {known_by} (labels: {', '.join(labels)})"
            )


# --------------------------------------------------------------------------------------------------
# GLUE through `datasets`: from the local cache, or from the hub when it answers


def _true(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE (read now, and as `datasets` read them at import)."""
    return (
        _true(os.environ.get("HF_HUB_OFFLINE"))
        or _true(os.environ.get("HF_DATASETS_OFFLINE"))
        or bool(datasets.config.HF_HUB_OFFLINE)
    )


def hub_reachable(timeout_s: float = HUB_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub (HF_ENDPOINT, default huggingface.co:443) opens within ``timeout_s``;
    name resolution included (it runs in a thread: a resolver that hangs does not hold the caller)."""
    url = urlparse(huggingface_hub.constants.ENDPOINT)
    address = (url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443))
    opened: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=timeout_s).close()
            opened.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout_s + 0.5)
    return bool(opened)


def glue_cached(name: str, cache_dir: str | None = None) -> bool:
    """Whether GLUE task ``name`` is in the local datasets cache (where `datasets` looks when offline)."""
    root = Path(cache_dir or datasets.config.HF_DATASETS_CACHE).expanduser() / GLUE_REPO.replace("/", "___") / name
    return any(os.path.isdir(p) for p in glob.glob(str(root / "*" / "*")))


def glue_problem(name: str, cache_dir: str | None = None) -> str | None:
    """Why GLUE task ``name`` cannot be loaded now (not cached, and the hub is off or does not answer within
    HUB_TIMEOUT_S), or None. Takes seconds at most: `datasets` itself can wait silently for minutes."""
    if glue_cached(name, cache_dir):
        return None
    cache = Path(cache_dir or datasets.config.HF_DATASETS_CACHE).expanduser()
    if hub_offline():
        why = "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set"
    elif not hub_reachable():
        why = f"the hub ({huggingface_hub.constants.ENDPOINT}) did not answer within {HUB_TIMEOUT_S:.0f} s"
    else:
        return None
    return (
        f"task.glue={name}: {GLUE_REPO} ({name}) is not in the local datasets cache ({cache}) and {why}; give "
        "--task.train_file/--task.dev_file (local .tsv/.csv/.jsonl files) instead, or run once where the hub "
        "answers to cache it"
    )


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """`datasets` and the hub client in offline mode for a while (they read the cache and open no connection)."""
    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def load_glue(cfg: TaskConfig, cache_dir: str | None = None) -> tuple[Split, list[Split], list[str] | None]:
    """GLUE train split and dev split(s) through ``datasets``: from the local cache when it holds the task (no
    connection is opened), else from the hub; a clear UserError within seconds when neither can serve it."""
    spec = GLUE[cfg.glue]
    problem = glue_problem(cfg.glue, cache_dir)
    if problem:
        raise UserError(problem)
    cached = glue_cached(cfg.glue, cache_dir)
    try:
        with _offline() if cached else contextlib.nullcontext():
            raw = datasets.load_dataset(GLUE_REPO, cfg.glue, cache_dir=cache_dir)
    except (ConnectionError, OSError) as exc:
        raise UserError(
            f"task.glue={cfg.glue}: cannot load {GLUE_REPO} ({cfg.glue}): {exc}; give --task.train_file/--task.dev_file"
        ) from exc

    def split(name: str, role: str) -> Split:
        ds = raw[name]
        labels = list(ds["label"]) if spec.kind == "regression" else [str(v) for v in ds["label"]]
        texts = list(zip(*(ds[c] for c in spec.text_columns)))
        return Split(name, texts, labels, role, f"glue:{cfg.glue}/{name}")

    names = raw["train"].features["label"].names if spec.kind == "classification" else None
    labels = [str(i) for i in range(len(names))] if names else None
    return split("train", "train"), [split(s, "dev") for s in spec.dev_splits], labels


# --------------------------------------------------------------------------------------------------
# splits, metrics, baseline


def compute_metrics(
    kind: str, predictions: np.ndarray, labels: np.ndarray, num_labels: int | None = None
) -> dict[str, float]:
    """Metrics of one split: classification predictions/labels are class ids, regression floats.

    Classification: accuracy, ``macro_f1`` (F1 averaged over the classes present), MCC; and for a two-class task
    (``num_labels`` 2) ``f1``, the binary F1 of class id 1 (GLUE's F1 of MRPC and QQP)."""
    if kind == "regression":
        return {
            "pearson": float(pearsonr(predictions, labels)[0]),
            "spearman": float(spearmanr(predictions, labels)[0]),
            "mse": float(np.mean((predictions - labels) ** 2)),
        }
    out = {
        "accuracy": float(accuracy_score(labels, predictions)),
        "macro_f1": float(f1_score(labels, predictions, average="macro", zero_division=0)),
        "mcc": float(matthews_corrcoef(labels, predictions)),
    }
    if num_labels == 2:
        out["f1"] = float(f1_score(labels, predictions, average="binary", pos_label=1, zero_division=0))
    return out


def majority_baseline(train: Split, splits: list[Split], labels: list[str]) -> dict[str, Any]:
    """The most frequent training label (the first in label order on a tie) and the accuracy of always
    predicting it on each split."""
    counts = Counter(train.labels)
    label = max(labels, key=lambda lab: counts[lab])  # max keeps the first of equal counts
    return {
        "label": label,
        "train_share": counts[label] / max(len(train.labels), 1),
        "accuracy": {s.name: sum(v == label for v in s.labels) / max(len(s.labels), 1) for s in splits},
        "examples": {s.name: len(s.labels) for s in splits},
    }


def beats_baseline(accuracy: float, baseline: float, examples: int) -> tuple[bool, float]:
    """(whether ``accuracy`` beats the majority ``baseline`` by more than noise, the margin needed): two standard
    errors of an accuracy of ``baseline`` on ``examples`` examples, sqrt(b (1 - b) / n)."""
    margin = 2 * (baseline * (1 - baseline) / max(examples, 1)) ** 0.5
    return accuracy > baseline + margin, margin


def _unique_names(splits: list[Split]) -> list[Split]:
    """A test file named like a dev file (two folders' dev.tsv) is keyed `test:NAME`."""
    seen: set[str] = set()
    for s in splits:
        if s.name in seen:
            s.name = f"{s.role}:{s.name}"
        seen.add(s.name)
    return splits


def load_splits(cfg: TaskConfig) -> tuple[Split, list[Split], list[str] | None]:
    """(train, dev splits then the test split, class names or None for regression), every label checked against
    the training file's. Each evaluation split's ``role`` is dev or test."""
    kind = task_kind(cfg)
    if cfg.glue:
        train, evals, labels = load_glue(cfg)
    else:
        train_file, dev_file = local_files(cfg)
        train = read_file(train_file, cfg, kind, "task.train_file")
        train.role = "train"
        evals = [read_file(dev_file, cfg, kind, "task.dev_file")]
        labels = label_set(train) if kind == "classification" else None
    if cfg.test_file:
        test = read_file(cfg.test_file, cfg, kind, "task.test_file")
        test.role = "test"
        evals.append(test)
    if labels is not None and not cfg.glue:
        for s in evals:
            check_dev_labels(s, labels, s.source)
    train = train.head(cfg.max_train_examples)
    return train, _unique_names([s.head(cfg.max_dev_examples) for s in evals]), labels


def load_eval_splits(cfg: TaskConfig, kind: str, labels: list[str] | None, known_by: str) -> list[Split]:
    """The dev and test splits `ctcd-ds evaluate` reads (:func:`eval_files`, or GLUE's dev splits), every label
    checked against ``labels`` (the model's); the training file is never read."""
    if cfg.glue:
        if cfg.dev_file or cfg.test_file:
            raise UserError(f"task.glue={cfg.glue}: give either a GLUE task or local files (task.dev_file/test_file)")
        _, evals, _ = load_glue(cfg)
    else:
        files = eval_files(cfg)
        if not files:
            raise UserError(
                f"task.train_file={cfg.train_file}: evaluate reads no training file; give --task.dev_file or "
                "--task.test_file"
            )
        evals = []
        for role, path in files:
            s = read_file(path, cfg, kind, f"task.{role}_file")
            s.role = role
            evals.append(s)
    if labels is not None:
        for s in evals:
            check_dev_labels(s, labels, s.source, known_by)
    return _unique_names([s.head(cfg.max_dev_examples) for s in evals])


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


class Predictions(NamedTuple):
    """A split's predictions: class ids (or floats for regression), the true labels, and the probability the model
    gives its predicted class (None for regression)."""

    predictions: np.ndarray
    labels: np.ndarray
    probabilities: np.ndarray | None


@torch.no_grad()
def predict(
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    data: datasets.Dataset,
    collator: PadCollator,
    batch_size: int,
    device,
) -> Predictions:
    """Predictions over a whole split (in its order)."""
    preds, golds, probs = [], [], []
    for start in range(0, len(data), batch_size):
        batch = collator(data[start : start + batch_size])
        logits = forward(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu()
        if collator.regression:
            preds.append(logits.squeeze(-1))
        else:
            p, ids = logits.softmax(-1).max(-1)
            preds.append(ids)
            probs.append(p)
        golds.append(batch["labels"])
    return Predictions(torch.cat(preds).numpy(), torch.cat(golds).numpy(), torch.cat(probs).numpy() if probs else None)


def predictions_file(split: Split, splits: list[Split]) -> str:
    """``predictions_<role>.jsonl`` (``predictions_<role>_<split>.jsonl`` where a role has several splits: MNLI)."""
    same_role = [s for s in splits if s.role == split.role]
    suffix = split.role if len(same_role) == 1 else f"{split.role}_{Path(split.name.split(':')[-1]).stem}"
    return f"predictions_{suffix}.jsonl"


def write_predictions(path: Path, split: Split, result: Predictions, labels: list[str] | None) -> Path:
    """One JSON line per example, in the split's order: text (a list for pairs), gold label, predicted label and,
    for classification, the probability of the predicted label."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for i, text in enumerate(split.texts):
            row: dict[str, Any] = {"text": text[0] if len(text) == 1 else list(text)}
            if labels is None:
                row |= {"label": float(split.labels[i]), "prediction": float(result.predictions[i])}
            else:
                row |= {
                    "label": split.labels[i],
                    "prediction": labels[int(result.predictions[i])],
                    "probability": round(float(result.probabilities[i]), 6),
                }
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


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
