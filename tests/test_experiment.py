"""The reproduction experiment in --quick mode: every stage runs, the table, JSON and plot have every row."""

from __future__ import annotations

import json

import pytest

from ctcd_ds.checks import experiment_problems
from ctcd_ds.config import ExperimentConfig, load_config
from ctcd_ds.experiment.report import verdict
from ctcd_ds.experiment.variants import MODELS, VARIANTS, finetune_config, pretrain_config

from conftest import free_port, run_cli


def test_bad_experiment_settings_are_named():
    args = ["--variants=[kd, ctcd, bogus]", "--scale=huge", "--seeds=[]", "--alpha_schedule=zigzag", "--peer_weight=-1"]
    problems: list[str] = []
    exp = load_config(None, args, ExperimentConfig, problems)
    problems += experiment_problems(exp)
    assert any("alpha_schedule=zigzag: must be one of" in p for p in problems)
    assert any("variants.2=bogus: must be one of" in p for p in problems)
    assert any("scale=huge" in p for p in problems)
    assert any("include standalone" in p for p in problems)
    assert any(p.startswith("seeds:") for p in problems)
    assert any(p.startswith("peer_weight=-1.0:") for p in problems)


def test_the_pair_by_scale_or_by_presets(tmp_path):
    """scale=ratio is the papers' depth ratio (6L -> 4L) at width 256, ~0.77x the parameters with the bundled
    vocabulary (the tiny pair is ~0.28x); teacher/student override either member; a name that is neither a
    preset nor a model directory is refused."""
    from ctcd_ds.models import parameters_of

    def models(*args: str) -> dict[str, str]:
        exp = load_config(None, [f"--output_dir={tmp_path}", *args], ExperimentConfig)
        assert experiment_problems(exp) == []
        return {n: m.model for n, m in pretrain_config(exp, "ctcd").members.items()}

    assert models() == {"teacher": "tiny-teacher", "student": "tiny-student"}
    assert models("--scale=ratio") == {"teacher": "ratio-teacher", "student": "ratio-student"}
    assert models("--scale=ratio", "--student=tiny-teacher") == {"teacher": "ratio-teacher", "student": "tiny-teacher"}
    assert models("--teacher=paper-teacher", "--student=paper-student")["teacher"] == "paper-teacher"
    vocab = 7983  # the bundled corpus's tokenizer
    ratio = parameters_of("ratio-student", vocab, 0) / parameters_of("ratio-teacher", vocab, 0)
    tiny = parameters_of("tiny-student", vocab, 0) / parameters_of("tiny-teacher", vocab, 0)
    assert 0.74 < ratio < 0.80 and 0.25 < tiny < 0.31, (ratio, tiny)
    bad = load_config(None, [f"--output_dir={tmp_path}", "--teacher=no-such-model"], ExperimentConfig)
    assert any(p.startswith("teacher=no-such-model: neither a model preset") for p in experiment_problems(bad))


def test_each_variant_puts_each_weight_on_its_edge(tmp_path):
    exp = load_config(
        None,
        [f"--output_dir={tmp_path}", "--alpha=0.3", "--beta=0.7", "--peer_weight=0.2", "--temperature=3"],
        ExperimentConfig,
    )
    expected = {
        "standalone": {},
        "kd": {("teacher", "student"): 0.7},
        "ctcd": {("student", "teacher"): 0.3, ("teacher", "student"): 0.7},
        "community_kd": {
            ("teacher", "student_a"): 0.7,
            ("teacher", "student_b"): 0.7,
            ("student_a", "student_b"): 0.2,
            ("student_b", "student_a"): 0.2,
        },
    }
    assert set(expected) == set(VARIANTS)
    for name, weights in expected.items():
        cfg = pretrain_config(exp, name)
        assert {(e.source, e.target): e.weight for e in cfg.edges} == weights, name
        assert all(e.temperature == 3 and e.schedule == "constant" for e in cfg.edges)
        assert cfg.output_dir == str(tmp_path / "pretrain" / name)
        trained = {n for n, m in cfg.members.items() if m.trainable}
        assert all(cfg.members[n].lr == exp.pretrain_lr for n in trained)
    kd_teacher = pretrain_config(exp, "kd").members["teacher"]
    assert (
        kd_teacher.model == str(tmp_path / "pretrain" / "standalone" / "export" / "teacher")
        and not kd_teacher.trainable
    )
    decaying = load_config(
        None, ["--alpha_schedule=linear", "--alpha_final=0.1", "--pretrain_steps=40"], ExperimentConfig
    )
    (alpha,) = [e for e in pretrain_config(decaying, "ctcd").edges if e.target == "teacher"]
    assert (alpha.schedule, alpha.weight, alpha.final_weight, alpha.schedule_end) == ("linear", 1.0, 0.1, 1.0)
    ft = finetune_config(exp, MODELS[3], seed=5)
    assert (
        ft.seed == 5
        and ft.members["model"].model.endswith("pretrain/ctcd/export/teacher")
        and ft.members["model"].lr == exp.finetune_lr
    )


def test_verdicts_come_from_the_spread():
    assert verdict([0.80, 0.81, 0.82], [0.70, 0.71, 0.72]) == "holds"
    assert verdict([0.70, 0.71, 0.72], [0.80, 0.81, 0.82]) == "reversed"
    assert verdict([0.6933, 0.70, 0.68], [0.6905, 0.66, 0.72]) == "within noise"  # 0.28 points against a spread of 2
    assert verdict([0.9], [0.1]) == "no noise estimate (one seed)"


@pytest.mark.parametrize("seeds", ["[1,2]"])
def test_quick_experiment_produces_table_json_and_plot(tmp_path, seeds):
    out = tmp_path / "experiment"
    args = [
        "bash",
        "launchers/reproduce.sh",
        f"MASTER_PORT={free_port()}",
        "--quick=true",
        f"--seeds={seeds}",
        f"--output_dir={out}",
    ]
    result = run_cli(args, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = (out / "results.md").read_text()
    for model in MODELS:
        assert f"| {model.label} |" in table
    assert (
        "(1) CTCD teacher beats the standalone teacher" in table
        and "(2) CTCD student beats the one-way-KD student" in table
    )
    assert "| standalone teacher |" in result.stdout  # the table is printed at the end
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == len(MODELS) and all(
        len(r["scores"]) == 2 and r["pretrain_eval"]["perplexity"] > 1 for r in rows
    )
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = run_cli(args, timeout=600)  # finished stages are skipped, the report is rebuilt
    assert again.returncode == 0 and again.stdout.count("done already, skipped") == 4
    assert "[experiment] fine-tune" not in again.stdout
