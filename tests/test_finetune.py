"""Fine-tuning and evaluation: local task files and their errors, single and co-distilled runs,
starting from an export or from a checkpoint, the evaluate command."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig, BertForMaskedLM

from ctcd_ds import cli, dist
from ctcd_ds.checks import check
from ctcd_ds.cli import main
from ctcd_ds.config import FinetuneConfig, TaskConfig, load_config
from ctcd_ds.errors import UserError
from ctcd_ds.export import export_checkpoint
from ctcd_ds.task_data import beats_baseline, load_splits
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
    assert set(metrics) == {"accuracy", "macro_f1", "mcc", "f1"} and 0 <= metrics["accuracy"] <= 1
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


def test_finetune_help_shows_the_finetuning_defaults_and_only_its_settings(capsys):
    with pytest.raises(SystemExit) as done:
        main(["finetune", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    member = FinetuneConfig().members["model"]  # the default member, not a pre-training member's defaults
    assert f"--members.NAME.lr (default {member.lr})" in text
    assert f"--members.NAME.warmup_ratio (default {member.warmup_ratio})" in text
    assert f'--members.NAME.model (default "{member.model}")' in text
    assert f"--train.steps (default {FinetuneConfig().train.steps})" in text
    flags = [line.split()[0] for line in text.splitlines() if line.startswith("  --")]
    for absent in ("prune", "minidisc", "init_from", "hidden_weight"):
        assert not [f for f in flags if absent in f], absent
    model_doc = text.split("--members.NAME.model")[1].split("--members.NAME.trainable")[0]
    assert "preset" not in model_doc and "checkpoints/step_N/NAME" in model_doc
    assert "--task.test_file" in flags


SWEEP = Path(__file__).resolve().parents[1] / "benchmarks/results/cpu-2026-11-27/finetune_lr_sweep.txt"


def test_the_default_lr_learned_for_both_presets_in_the_recorded_sweep():
    """The default lr is one at which both tiny presets, pretrained, clearly beat the majority-class baseline on the
    bundled SST-2 in benchmarks/finetune_lr_sweep.py's recorded run (1e-4, the old default, left the student at it)."""
    lines = SWEEP.read_text().splitlines()
    baseline = float(next(line for line in lines if line.startswith("majority-class baseline")).split()[-1])
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["lr"])
    models = lines[header].split()[1:]
    table = {}
    for line in lines[header + 1 :]:
        cells = re.sub(r"\[[^\]]*\]", "", line).split()  # the means, without each seed's score in brackets
        if not cells or cells[0].startswith("majority"):
            break
        table[float(cells[0])] = [float(c) for c in cells[1:]]
    assert models == ["student", "teacher"] and len(table) >= 4
    scores = table[FinetuneConfig().members["model"].lr]
    assert len(scores) == 2 and all(score > baseline + 0.1 for score in scores), (scores, baseline)


def test_majority_baseline_test_file_and_predictions(tmp_path, mlm_dir, capsys):
    """results.json names its files, holds the majority-class baseline, the test split's metrics (evaluated at the
    end only) and per-example predictions; a member that does not beat the baseline gets a warning line."""
    train = tmp_path / "train.tsv"
    train.write_text("sentence\tlabel\n" + "".join(f"good film {i}\tpos\n" for i in range(24)) + "bad\tneg\n" * 8)
    dev = tmp_path / "dev.tsv"
    dev.write_text("sentence\tlabel\n" + "fine\tpos\n" * 6)  # all the majority label: nothing beats 100%
    test = tmp_path / "test.tsv"
    test.write_text("sentence\tlabel\nbad film\tneg\nnice\tpos\nawful\tneg\nok\tpos\n")
    out = tmp_path / "ft"
    args = [f"--task.train_file={train}", f"--task.dev_file={dev}", f"--task.test_file={test}"]
    finetune([*small(out, mlm_dir), *args, "--train.steps=2"])
    results = json.loads((out / "results.json").read_text())
    assert results["train_file"] == str(train)
    assert results["splits"] == {
        "dev.tsv": {"role": "dev", "file": str(dev), "examples": 6},
        "test.tsv": {"role": "test", "file": str(test), "examples": 4},
    }
    assert results["majority_baseline"] == {
        "label": "pos",
        "train_share": 0.75,
        "accuracy": {"dev.tsv": 1.0, "test.tsv": 0.5},
        "examples": {"dev.tsv": 6, "test.tsv": 4},
    }
    assert set(results["members"]["model"]) == {"dev.tsv", "test.tsv"}
    assert set(results["members"]["model"]["test.tsv"]) == {"accuracy", "macro_f1", "mcc", "f1"}
    evaluated = [m for m in read_metrics(out) if any(k.startswith("eval/") for k in m)]
    assert evaluated and all("test" not in k for m in evaluated for k in m)  # the test split is not logged
    rows = [json.loads(line) for line in (out / "predictions/model/predictions_test.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["bad film", "nice", "awful", "ok"] and rows[0]["label"] == "neg"
    assert all(r["prediction"] in ("neg", "pos") and 0.5 <= r["probability"] <= 1 for r in rows)
    assert results["predictions"]["model"]["dev.tsv"] == str(out / "predictions/model/predictions_dev.jsonl")
    capsys.readouterr()
    cli._print_finetune_results(results)
    printed = capsys.readouterr().out
    assert "(majority baseline: accuracy=1.0000, always 'pos')" in printed
    assert "warning: model dev.tsv: accuracy" in printed and "does not beat the majority-class baseline" in printed


def test_beating_the_baseline_means_by_more_than_noise():
    # the sweep's student at lr 1e-4: 0.558 on the bundled SST-2 dev (6735 sentences) against always-1 0.5555
    assert beats_baseline(0.558, 0.5555, 6735) == (False, pytest.approx(2 * (0.5555 * 0.4445 / 6735) ** 0.5))
    assert beats_baseline(0.78, 0.5555, 6735)[0] and not beats_baseline(0.565, 0.5555, 6735)[0]
    assert beats_baseline(0.58, 0.5555, 6735)[0] and not beats_baseline(0.58, 0.5555, 872)[0]  # n decides
