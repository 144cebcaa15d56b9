"""`ctcd-ds evaluate` and the task data behind it: dev and test files without the training file, per-example
predictions, the files named in the results, metric names, GLUE without the hub, and its command-line mistakes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import datasets
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from ctcd_ds import task_data
from ctcd_ds.checks import check
from ctcd_ds.cli import main
from ctcd_ds.config import FinetuneConfig, TaskConfig, load_config
from ctcd_ds.errors import UserError
from ctcd_ds.task_data import compute_metrics, glue_problem
from ctcd_ds.tokenizer import load_tokenizer

from conftest import PYTHON, run_cli

LABELS = ["neg", "neu", "pos"]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tokenizer_dir) -> Path:
    """A (untrained) 3-class sequence classifier with the test tokenizer, as `export/NAME` of a fine-tuning run
    looks: its label set is only in its config (id2label)."""
    out = tmp_path_factory.mktemp("clf") / "model"
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=1000,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
    )
    BertForSequenceClassification(config).save_pretrained(out)
    load_tokenizer(tokenizer_dir).save_pretrained(str(out))
    return out


def write(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
    return path


def test_evaluate_reads_only_dev_and_test_and_writes_predictions(tmp_path, classifier, capsys):
    dev = write(tmp_path / "dev.tsv", [("a fine film", "pos"), ("dull", "neg"), ("so so", "neu")])
    test_dir = tmp_path / "held_out"
    test_dir.mkdir()
    test = write(test_dir / "dev.tsv", [("great", "pos"), ("awful", "neg")])  # named like the dev file
    out = tmp_path / "eval" / "results.json"
    code = main(
        [
            "evaluate",
            "--model",
            str(classifier),
            "--task.train_file=/nonexistent/train.tsv",  # given or not, evaluate never reads it
            "--task.dev_file",  # the space form of an override
            str(dev),
            f"--task.test_file={test}",
            f"--out={out}",
        ]
    )
    printed = capsys.readouterr()
    assert code == 0, printed.err
    report = json.loads(out.read_text())
    assert report["splits"] == {
        "dev.tsv": {"role": "dev", "file": str(dev), "examples": 3},
        "test:dev.tsv": {"role": "test", "file": str(test), "examples": 2},
    }
    assert set(report["results"]["dev.tsv"]) == {"accuracy", "macro_f1", "mcc"}  # 3 classes: no binary f1
    rows = [json.loads(line) for line in (out.parent / "predictions_dev.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["a fine film", "dull", "so so"]
    assert [r["label"] for r in rows] == ["pos", "neg", "neu"]
    assert all(r["prediction"] in LABELS and 1 / 3 <= r["probability"] <= 1 for r in rows)
    accuracy = np.mean([r["prediction"] == r["label"] for r in rows])
    assert report["results"]["dev.tsv"]["accuracy"] == pytest.approx(accuracy)
    assert len((out.parent / "predictions_test.jsonl").read_text().splitlines()) == 2
    assert report["predictions"]["test:dev.tsv"] == str(out.parent / "predictions_test.jsonl")
    assert f"dev: {dev} (3 examples)" in printed.out and f"test: {test} (2 examples)" in printed.out


def test_evaluate_labels_come_from_the_model(tmp_path, classifier, capsys):
    dev = write(tmp_path / "dev.tsv", [("fine", "pos"), ("meh", "mixed")])
    assert main(["evaluate", "--model", str(classifier), f"--task.dev_file={dev}"]) == 2
    err = capsys.readouterr().err
    assert f"error: {dev}: example 2 has label 'mixed', which the model does not know" in err
    assert "labels: neg, neu, pos" in err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--task.dev_fiel=x.tsv"], "error: task.dev_fiel: unknown setting (did you mean 'dev_file'?)"),
        (["--task.dev_file=/nope/dev.tsv"], "error: task.dev_file=/nope/dev.tsv: no such file"),
        (["--task.test_file=/nope/test.tsv"], "error: task.test_file=/nope/test.tsv: no such file"),
        (["--train.steps", "3"], "error: --train.steps: evaluate takes only --task.* settings"),
        (["--task.train_file=/nope/train.tsv"], "evaluate reads no training file; give --task.dev_file"),
    ],
)
def test_evaluate_mistakes_exit_2(args, expected, classifier, capsys):
    assert main(["evaluate", "--model", str(classifier), *args]) == 2
    assert expected in capsys.readouterr().err


def test_evaluate_command_line_errors(tmp_path, classifier):
    """Through the installed entry point: a missing model directory, and argparse's own mistakes, exit 2."""
    cases = {
        ("--model", str(tmp_path / "none")): f"error: --model={tmp_path / 'none'}: not a model directory",
        ("--modle", str(classifier)): "the following arguments are required: --model",
    }
    for args, expected in cases.items():
        result = run_cli([PYTHON, "-m", "ctcd_ds.cli", "evaluate", *args])
        assert result.returncode == 2, (args, result.stderr)
        assert expected in result.stderr and "Traceback" not in result.stderr


def test_metric_names():
    """Macro-F1 is named macro_f1; `f1` is the binary F1 of class 1 (GLUE's for MRPC and QQP), two-class only."""
    gold, pred = np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2])
    three = compute_metrics("classification", pred, gold, num_labels=3)
    assert set(three) == {"accuracy", "macro_f1", "mcc"}
    assert three["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    gold, pred = np.array([0, 1, 1, 0]), np.array([1, 1, 1, 0])
    two = compute_metrics("classification", pred, gold, num_labels=2)
    assert two["f1"] == pytest.approx(0.8) and two["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert task_data.task_metrics(TaskConfig()) == ("accuracy", "macro_f1", "mcc")
    assert task_data.task_metrics(TaskConfig(glue="mrpc")) == ("accuracy", "f1")


@pytest.fixture
def empty_datasets_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def test_glue_without_the_hub_fails_in_seconds(tmp_path, empty_datasets_cache, classifier, monkeypatch, capsys):
    """Not cached and offline (the tests' environment): one clear line from the check, before anything is written;
    `ctcd-ds evaluate` says the same."""
    cfg = load_config(None, [f"--output_dir={tmp_path / 'ft'}", "--task.glue=rte"], FinetuneConfig)
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        check(cfg)
    assert time.monotonic() - start < 10
    (line,) = [p for p in err.value.problems if p.startswith("task.glue=rte")]
    assert "not in the local datasets cache" in line and "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set" in line
    assert "give --task.train_file/--task.dev_file" in line
    assert not (tmp_path / "ft").exists()
    assert main(["evaluate", "--model", str(classifier), "--task.glue=rte"]) == 2
    assert "error: task.glue=rte: nyu-mll/glue (rte) is not in the local datasets cache" in capsys.readouterr().err


def test_glue_with_an_unreachable_hub(empty_datasets_cache, monkeypatch):
    """Online mode, but the hub does not answer (a closed local port here): the connect probe gives up quickly."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://127.0.0.1:9")
    start = time.monotonic()
    problem = glue_problem("sst2")
    assert time.monotonic() - start < task_data.HUB_TIMEOUT_S + 2
    assert "the hub (https://127.0.0.1:9) did not answer within 5 s" in problem
    # a task in the local cache needs no hub
    (empty_datasets_cache / "nyu-mll___glue" / "sst2" / "1.0.0" / "abc123").mkdir(parents=True)
    assert glue_problem("sst2") is None
