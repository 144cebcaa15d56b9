"""Distillation schedules as recipes: edge weight schedules, DWT (with remapping), Community KD, HomoDistil,
MiniDisc."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM

from ctcd_ds import layout
from ctcd_ds.errors import UserError
from ctcd_ds.graph import scheduled_weight
from ctcd_ds.models import build_model, count_parameters, remap_init
from ctcd_ds.pruning.schedule import cubic_kept
from ctcd_ds.tokenizer import load_tokenizer

from conftest import PYTHON, free_port, read_metrics, run, run_cli


@pytest.mark.parametrize(
    "schedule,expected",
    [
        ("constant", [4.0, 4.0, 4.0, 4.0, 4.0, 4.0]),
        ("linear", [4.0, 3.25, 2.5, 1.75, 1.0, 1.0]),
        ("cosine", [4.0, 4 - 3 * (1 - 2**-0.5) / 2, 2.5, 1 + 3 * (1 - 2**-0.5) / 2, 1.0, 1.0]),
        ("step", [4.0, 4.0, 4.0, 4.0, 1.0, 1.0]),
    ],
)
def test_weight_schedules(schedule, expected):
    got = [scheduled_weight(schedule, 4.0, 1.0, 4, step) for step in range(6)]
    assert got == pytest.approx(expected)


@pytest.fixture(scope="module")
def weak_teacher(tmp_path_factory, tokenizer_dir) -> Path:
    """A 'pretrained' 2L-256 model (random weights) with the run's tokenizer: weaker than tiny-teacher 4L-256."""
    out = tmp_path_factory.mktemp("weak") / "model"
    torch.manual_seed(0)
    BertForMaskedLM(
        BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024)
    ).save_pretrained(out)
    load_tokenizer(tokenizer_dir).save_pretrained(str(out))
    return out


def test_remapping_copies_layers_and_repeats_the_last(weak_teacher):
    student = build_model("tiny-teacher", 1000, 0)
    mapping = remap_init(student, str(weak_teacher))
    assert mapping == [0, 1, 1, 1]
    source = BertForMaskedLM.from_pretrained(weak_teacher)
    for dst, src in enumerate(mapping):
        for (name, a), b in zip(
            student.bert.encoder.layer[dst].state_dict().items(), source.bert.encoder.layer[src].state_dict().values()
        ):
            assert torch.equal(a, b), (dst, name)
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, source.bert.embeddings.word_embeddings.weight)
    assert torch.equal(student.cls.predictions.transform.dense.weight, source.cls.predictions.transform.dense.weight)


def test_remapping_needs_equal_widths(weak_teacher):
    with pytest.raises(UserError, match="hidden_size=256 differs from this member's hidden_size=128"):
        remap_init(build_model("tiny-student", 1000, 0), str(weak_teacher))


def _tiny(out: Path) -> list[str]:
    return [
        f"--output_dir={out}",
        "--data.seq_len=64",
        "--data.max_train_blocks=128",
        "--train.micro_batch_size=8",
        "--train.steps=6",
        "--train.log_every=1",
        "--train.eval_batches=1",
        "--checkpoint.every=0",
    ]


def test_dwt_recipe_follows_its_weight_schedule_and_remaps(weak_teacher, tmp_path):
    _, run_dir = run(
        [
            *_tiny(tmp_path / "dwt"),
            f"--members.weak_teacher.model={weak_teacher}",
            f"--members.student.init_from={weak_teacher}",
        ],
        config="dwt",
    )
    train = [m for m in read_metrics(run_dir) if "student/total_loss" in m]
    # the recipe's schedule_end=0.4: 4 -> 1 over the first 40% of this 6-step run (2.4 -> 2 steps), then 1
    assert [m["edge/weak_teacher->student/weight"] for m in train] == pytest.approx([4.0, 2.5, 1.0, 1.0, 1.0, 1.0])
    for m in train:  # the logged weight is the one applied
        w = m["edge/weak_teacher->student/weight"]
        assert m["student/total_loss"] == pytest.approx(
            m["student/mlm_loss"] + w * m["student/kd_loss_from_weak_teacher"], rel=1e-5
        )
    assert "weak_teacher/total_loss" not in train[0]


def test_community_kd_one_rank(weak_teacher, tmp_path):
    _, run_dir = run(
        [*_tiny(tmp_path / "ckd"), f"--members.teacher.model={weak_teacher}", "--train.steps=2"], config="community_kd"
    )
    first = read_metrics(run_dir)[0]
    for me, peer in (("student_a", "student_b"), ("student_b", "student_a")):
        assert first[f"{me}/kd_loss_from_teacher"] > 0 and first[f"{me}/kd_loss_from_{peer}"] > 0
        assert first[f"{me}/total_loss"] == pytest.approx(
            first[f"{me}/mlm_loss"] + first[f"{me}/kd_loss_from_teacher"] + first[f"{me}/kd_loss_from_{peer}"], rel=1e-5
        )
    assert first["student_a/mlm_loss"] != first["student_b/mlm_loss"]  # two differently initialised students


def _same_weights(a: Path, b: Path) -> None:
    live, offline = (
        AutoModelForMaskedLM.from_pretrained(a).state_dict(),
        AutoModelForMaskedLM.from_pretrained(b).state_dict(),
    )
    assert live.keys() == offline.keys()
    for k in live:
        torch.testing.assert_close(live[k], offline[k], rtol=0, atol=0, msg=k)


def test_homodistil_prunes_on_its_schedule_and_exports_a_smaller_model(weak_teacher, tmp_path):
    summary, run_dir = run(
        [
            *_tiny(tmp_path / "homo"),
            f"--members.teacher.model={weak_teacher}",
            "--train.steps=8",
            "--members.student.prune.end=0.5",
            "--checkpoint.every=4",
        ],
        config="homodistil",
    )
    train = [m for m in read_metrics(run_dir) if "student/total_loss" in m]
    progress = [(s + 1) / 4 for s in range(8)]  # start 0, end = 0.5 x 8 steps
    assert [m["student/kept_ffn"] for m in train] == [cubic_kept(1024, 512, p) for p in progress]
    assert [m["student/kept_hidden"] for m in train] == [cubic_kept(256, 128, p) for p in progress]
    assert [m["student/kept_heads"] for m in train] == [cubic_kept(4, 2, p) for p in progress]
    assert train[-1]["student/kept_hidden"] == 128 and train[3]["student/kept_ffn"] == 512
    for m in train:  # MLM + prediction KL + hidden-state MSE, all weight 1
        assert m["student/hidden_mse_from_teacher"] > 0
        assert m["student/total_loss"] == pytest.approx(
            m["student/mlm_loss"] + m["student/kd_loss_from_teacher"] + m["student/hidden_mse_from_teacher"], rel=1e-5
        )
    assert (
        train[0]["student/kd_loss_from_teacher"] < 0.05
    )  # a copy of the teacher: only dropout (and the first pruning) differ
    student = AutoModelForMaskedLM.from_pretrained(summary["exports"]["student"])
    c = student.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == (2, 128, 2, 512)
    teacher = AutoModelForMaskedLM.from_pretrained(weak_teacher)
    assert count_parameters(student) < count_parameters(teacher) / 2
    offline = tmp_path / "offline"
    result = run_cli([PYTHON, "-m", "ctcd_ds.cli", "export", "--checkpoint", str(run_dir), "--out", str(offline)])
    assert result.returncode == 0, result.stderr
    _same_weights(Path(summary["exports"]["student"]), offline / "student")


def test_minidisc_picks_the_best_scoring_teacher_assistant(weak_teacher, tmp_path, capsys):
    overrides = [*_tiny(tmp_path / "minidisc"), f"--members.teacher.model={weak_teacher}", "--train.steps=2"]
    summary, run_dir = run(overrides, config="minidisc")
    table = json.loads((run_dir / "minidisc_candidates.json").read_text())["ta"]
    rows = table["candidates"]
    assert [r["sparsity"] for r in rows] == [0.25, 0.5, 0.75]  # one row per candidate
    assert [(r["hidden"], r["heads"], r["ffn"]) for r in rows] == [(192, 3, 768), (128, 2, 512), (64, 1, 256)]
    # a TA sits between teacher and student: the 0.5 candidate has the student's shape (2L-128), 0.75 is smaller
    student = count_parameters(build_model("tiny-student", 1000, 0))
    assert table["student"] == "student" and table["student_params"] == student
    assert table["teacher_params"] == count_parameters(AutoModelForMaskedLM.from_pretrained(weak_teacher))
    assert [r["params"] > student for r in rows] == [True, False, False]
    assert rows[0]["score"] == pytest.approx(rows[0]["mlm_accuracy"] + 0.2 * rows[0]["param_sparsity"])
    assert rows[1]["score"] is None and rows[2]["score"] is None  # listed, not scored
    assert all(0 < r["param_sparsity"] < 1 for r in rows)
    assert table["chosen"] == 0
    printed = capsys.readouterr().out
    assert "MiniDisc candidates" in printed and "(unpruned)" in printed and "not eligible" in printed
    assert f"ta: a copy of teacher's model ({weak_teacher})" in printed  # not just the source's path
    best = rows[table["chosen"]]
    ta = AutoModelForMaskedLM.from_pretrained(summary["exports"]["ta"])
    assert (ta.config.hidden_size, ta.config.num_attention_heads, ta.config.intermediate_size) == (
        best["hidden"],
        best["heads"],
        best["ffn"],
    )
    assert count_parameters(ta) == best["params"]
    first = read_metrics(run_dir)[0]
    assert (
        first["ta/kd_loss_from_teacher"] > 0
        and first["student/kd_loss_from_ta"] > 0
        and "teacher/total_loss" not in first
    )
    # the choice is part of the checkpoint's trainer state: export and resume need nothing else
    state = json.loads((layout.latest(run_dir) / layout.STATE_FILE).read_text())
    assert state["task"]["ta"]["minidisc"] == {"hidden": best["hidden"], "heads": best["heads"], "ffn": best["ffn"]}
    (run_dir / "minidisc_candidates.json").unlink()
    offline = tmp_path / "offline"
    result = run_cli([PYTHON, "-m", "ctcd_ds.cli", "export", "--checkpoint", str(run_dir), "--out", str(offline)])
    assert result.returncode == 0, result.stderr
    _same_weights(Path(summary["exports"]["ta"]), offline / "ta")
    # resuming rebuilds the recorded choice instead of selecting again
    shutil.rmtree(run_dir / "export")
    run(overrides, config="minidisc")
    out = capsys.readouterr().out
    assert "MiniDisc candidates" not in out and "the teacher assistant chosen earlier (hidden " in out
    _same_weights(offline / "ta", run_dir / "export" / "ta")


def test_minidisc_refuses_when_no_candidate_is_larger_than_the_student(weak_teacher, tmp_path):
    overrides = [
        *_tiny(tmp_path / "minidisc"),
        f"--members.teacher.model={weak_teacher}",
        "--members.ta.minidisc.sparsities=[0.5,0.75]",
    ]
    with pytest.raises(UserError, match=r"members.ta.minidisc.sparsities=\[0.5, 0.75\]: every candidate .* no larger "):
        run(overrides, config="minidisc")
    assert not (tmp_path / "minidisc").exists()  # refused before the run wrote anything


def test_sandwich_averages_the_kd_loss_over_sub_networks(weak_teacher, tmp_path):
    summary, run_dir = run(
        [
            *_tiny(tmp_path / "sandwich"),
            f"--members.teacher.model={weak_teacher}",
            "--train.steps=3",
            "--members.ta.minidisc.sparsities=[0.25]",
            "--members.student.minidisc.sandwich=[0.5,0.25]",
        ],
        config="minidisc",
    )
    train = [m for m in read_metrics(run_dir) if "student/total_loss" in m]
    for m in train:
        views = [m["student/kd_loss_from_ta"], m["student@0.5/kd_loss_from_ta"], m["student@0.25/kd_loss_from_ta"]]
        assert len(set(views)) == 3  # three different (sub-)networks
        assert m["edge/ta->student@0.5/weight"] == pytest.approx(1 / 3) and m[
            "edge/ta->student/weight"
        ] == pytest.approx(1 / 3)
        assert m["student/total_loss"] == pytest.approx(m["student/mlm_loss"] + sum(views) / 3, rel=1e-5)
    student = AutoModelForMaskedLM.from_pretrained(summary["exports"]["student"])
    assert (student.config.num_hidden_layers, student.config.hidden_size) == (2, 128)  # weight-shared: the full student


@pytest.mark.parametrize(
    "recipe,member_flag",
    [("dwt", "weak_teacher"), ("community_kd", "teacher"), ("homodistil", "teacher"), ("minidisc", "teacher")],
)
def test_recipes_on_two_ranks(recipe, member_flag, weak_teacher, tmp_path):
    out = tmp_path / recipe
    extra = (
        ["--members.student.minidisc.sandwich=[0.5]"] if recipe == "minidisc" else []
    )  # with the optional sandwich views
    result = run_cli(
        [
            "bash",
            "launchers/pretrain.sh",
            "NUM_GPUS=2",
            f"MASTER_PORT={free_port()}",
            f"CONFIG={recipe}",
            *_tiny(out),
            "--train.steps=3",
            f"--members.{member_flag}.model={weak_teacher}",
            *extra,
        ],
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics if any(k.endswith("/total_loss") for k in m)] == [1, 2, 3]
    assert sorted(p.name for p in (out / "checkpoints" / "step_00000003").glob("rng_rank*")) == [
        "rng_rank00000.pt",
        "rng_rank00001.pt",
    ]
    if recipe == "homodistil":  # pruned to its target within the run, on both ranks alike (the export is rank 0's)
        assert [m["student/kept_hidden"] for m in metrics if "student/kept_hidden" in m] == [
            cubic_kept(256, 128, p) for p in (0.5, 1.0, 1.0)
        ]
        c = AutoModelForMaskedLM.from_pretrained(out / "export" / "student").config
        assert (c.hidden_size, c.num_attention_heads, c.intermediate_size) == (128, 2, 512)
    if recipe == "minidisc":
        assert "MiniDisc candidates" in result.stdout and "<- teacher assistant" in result.stdout
        assert all(m["student@0.5/kd_loss_from_ta"] > 0 for m in metrics if "student/total_loss" in m)
