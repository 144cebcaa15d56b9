"""Fine-tuning and evaluation: local task files and their errors, single and co-distilled runs,
starting from an export or from a checkpoint, the evaluate command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig, BertForMaskedLM

from ctcd_ds import dist
from ctcd_ds.checks import check
from ctcd_ds.config import FinetuneConfig, TaskConfig, load_config
from ctcd_ds.errors import UserError
from ctcd_ds.export import export_checkpoint
from ctcd_ds.task_data import load_splits
from ctcd_ds.tokenizer import load_tokenizer
from ctcd_ds.trainer import run_finetune

from conftest import MINI, PYTHON, read_metrics, run, run_cli


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A small masked LM with the test tokenizer, as `export/NAME` directories look."""
    out = tmp_path_factory.mktemp("mlm") / "model"
    torch.manual_seed(0)
    BertForMaskedLM(
        BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128)
    ).save_pretrained(out)
    load_tokenizer(tokenizer_dir).save_pretrained(str(out))
    return out


def finetune(overrides: list[str]) -> dict:
    cfg = load_config(None, overrides, FinetuneConfig)
    check(cfg)
    dist.init_distributed()
    return run_finetune(cfg)


def small(out: Path, model: Path) -> list[str]:
    return [
        f"--output_dir={out}",
        f"--members.model.model={model}",
        "--members.model.lr=1e-3",
        "--task.max_train_examples=256",
        "--task.max_dev_examples=64",
        "--task.seq_len=32",
        "--train.micro_batch_size=16",
        "--train.steps=8",
        "--train.log_every=1",
    ]


def test_local_files_pairs_string_labels_no_header_and_jsonl(tmp_path):
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("a cat\ta dog\tyes\nthe sun\tthe moon\tno\nred\tblue\tyes\n")
    cfg = TaskConfig(train_file=str(tsv), dev_file=str(tsv), text_columns=["0", "1"], label_column="2", header=False)
    train, (dev,), labels = load_splits(cfg)
    assert labels == ["no", "yes"] and train.texts[0] == ("a cat", "a dog") and len(dev.texts) == 3
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text('{"s": "good", "y": 0.5}\n{"s": "bad", "y": 4}\n')
    cfg = TaskConfig(
        train_file=str(jsonl), dev_file=str(jsonl), text_columns=["s"], label_column="y", kind="regression"
    )
    train, _, labels = load_splits(cfg)
    assert labels is None and train.labels == [0.5, 4.0]


def test_bad_task_files_are_named(tmp_path, mlm_dir):
    train = tmp_path / "train.tsv"
    train.write_text("sentence\tlabel\ngood\tpos\nbad\tneg\n")
    dev = tmp_path / "dev.tsv"
    dev.write_text("sentence\tlabel\nok\tneutral\n")
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    numbers = tmp_path / "num.tsv"
    numbers.write_text("sentence\tlabel\nfine\t0.5\nodd\thigh\n")
    cases = {
        (
            str(train),
            str(dev),
            "auto",
            "label",
        ): "dev.tsv: example 1 has label 'neutral', which the training file never uses",
        (str(train), str(train), "auto", "score"): "no column 'score' (columns: sentence, label)",
        (str(empty), str(dev), "auto", "label"): "the file has no examples (empty file)",
        (str(numbers), str(numbers), "regression", "label"): "num.tsv:3: column 'label' = 'high' is not a number",
    }
    for (tr, dv, kind, label), expected in cases.items():
        cfg = load_config(
            None,
            [
                f"--members.model.model={mlm_dir}",
                f"--task.train_file={tr}",
                f"--task.dev_file={dv}",
                f"--task.kind={kind}",
                f"--task.label_column={label}",
                f"--output_dir={tmp_path / 'x'}",
            ],
            root=FinetuneConfig,
        )
        with pytest.raises(UserError) as err:
            check(cfg)
        assert any(expected in p for p in err.value.problems), (expected, err.value.problems)
    assert not (tmp_path / "x").exists()


def test_finetune_sst2_export_and_evaluate_command(tmp_path, mlm_dir):
    summary = finetune(small(tmp_path / "ft", mlm_dir))
    results = json.loads((tmp_path / "ft" / "results.json").read_text())
    metrics = results["members"]["model"]["dev.tsv"]
    assert set(metrics) == {"accuracy", "f1", "mcc"} and 0 <= metrics["accuracy"] <= 1
    assert results["main_metric"] == "accuracy" and results["step"] == 8
    exported = AutoModelForSequenceClassification.from_pretrained(summary["exports"]["model"])
    assert exported.config.id2label == {0: "0", 1: "1"} and exported.config.num_labels == 2
    train = [m for m in read_metrics(tmp_path / "ft") if "model/task_loss" in m]
    assert len(train) == 8 and "model/grad_norm" in train[0]
    result = run_cli(
        [
            PYTHON,
            "-m",
            "ctcd_ds.cli",
            "evaluate",
            "--model",
            summary["exports"]["model"],
            "--task.max_dev_examples=64",
            "--task.seq_len=32",
            "--out",
            str(tmp_path / "eval.json"),
        ]
    )
    assert result.returncode == 0, result.stderr
    again = json.loads((tmp_path / "eval.json").read_text())["results"]["dev.tsv"]
    assert again["accuracy"] == pytest.approx(metrics["accuracy"])  # the export predicts as the engine did
    assert "dev.tsv: accuracy=" in result.stdout
    # the fine-tuning checkpoint exports offline to the same classifier
    offline = export_checkpoint(tmp_path / "ft", tmp_path / "offline")
    restored = AutoModelForSequenceClassification.from_pretrained(offline["model"])
    assert restored.config.id2label == exported.config.id2label
    live = exported.state_dict()
    assert all(torch.equal(v, live[k]) for k, v in restored.state_dict().items())


def test_codistillation_on_class_logits_from_a_checkpoint(tmp_path, tokenizer_dir):
    summary, run_dir = run(
        [
            f"--output_dir={tmp_path / 'pre'}",
            f"--tokenizer.path={tokenizer_dir}",
            *MINI,
        ]
    )
    ckpt = Path(summary["checkpoint"])
    summary = finetune(
        [
            *small(tmp_path / "co", ckpt / "teacher"),
            f"--members.student.model={ckpt / 'student'}",
            "--members.student.lr=1e-3",
            "--edges=[{source: model, target: student}, {source: student, target: model}]",
        ]
    )
    first = read_metrics(tmp_path / "co")[0]
    assert first["student/kd_loss_from_model"] > 0 and first["model/kd_loss_from_student"] > 0
    assert first["student/total_loss"] == pytest.approx(
        first["student/task_loss"] + first["student/kd_loss_from_model"], rel=1e-5
    )
    assert set(summary["metrics"]) == {"model", "student"}
    assert (tmp_path / "co" / "init" / "teacher" / "config.json").is_file()  # the checkpoint member was exported first


def test_regression_task(tmp_path, mlm_dir):
    data = tmp_path / "reg.csv"
    data.write_text("text,score\n" + "".join(f"sample number {i},{i % 5}\n" for i in range(64)))
    finetune(
        [
            *small(tmp_path / "reg", mlm_dir),
            f"--task.train_file={data}",
            f"--task.dev_file={data}",
            "--task.text_columns=[text]",
            "--task.label_column=score",
            "--task.kind=regression",
        ]
    )
    metrics = json.loads((tmp_path / "reg" / "results.json").read_text())["members"]["model"]["reg.csv"]
    assert set(metrics) == {"pearson", "spearman", "mse"}
