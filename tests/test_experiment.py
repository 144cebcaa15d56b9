"""The reproduction experiment in --quick mode: every stage runs, the table, JSON and plot have every row."""

from __future__ import annotations

import json

import pytest

from ctcd_ds.checks import experiment_problems
from ctcd_ds.config import ExperimentConfig, load_config
from ctcd_ds.experiment.report import Comparison, paired
from ctcd_ds.experiment.variants import MODELS, VARIANTS, finetune_config, pretrain_config

from conftest import free_port, run_cli


def test_bad_experiment_settings_are_named():
    args = [
        "--variants=[kd, ctcd, bogus]",
        "--scale=huge",
        "--seeds=[]",
        "--pretrain_seeds=[4,4]",
        "--alpha_schedule=zigzag",
        "--peer_weight=-1",
    ]
    problems: list[str] = []
    exp = load_config(None, args, ExperimentConfig, problems)
    problems += experiment_problems(exp)
    assert any("alpha_schedule=zigzag: must be one of" in p for p in problems)
    assert any("variants.2=bogus: must be one of" in p for p in problems)
    assert any("scale=huge" in p for p in problems)
    assert any("include standalone" in p for p in problems)
    assert any(p.startswith("seeds:") for p in problems)
    assert any(p.startswith("pretrain_seeds=[4, 4]: a seed is given twice") for p in problems)
    assert any(p.startswith("peer_weight=-1.0:") for p in problems)


def test_the_pair_by_scale_or_by_presets(tmp_path):
    """scale=ratio is the papers' depth ratio (6L -> 4L) at width 256, ~0.77x the parameters with the bundled
    vocabulary (the tiny pair is ~0.28x); teacher/student override either member; a name that is neither a
    preset nor a model directory is refused."""
    from ctcd_ds.models import parameters_of

    def models(*args: str) -> dict[str, str]:
        exp = load_config(None, [f"--output_dir={tmp_path}", *args], ExperimentConfig)
        assert experiment_problems(exp) == []
        return {n: m.model for n, m in pretrain_config(exp, "ctcd", 1).members.items()}

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
        [
            f"--output_dir={tmp_path}",
            "--alpha=0.3",
            "--beta=0.7",
            "--peer_weight=0.2",
            "--temperature=3",
            "--pretrain_seq_len=64",
        ],
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
        cfg = pretrain_config(exp, name, 7)
        assert {(e.source, e.target): e.weight for e in cfg.edges} == weights, name
        assert all(e.temperature == 3 and e.schedule == "constant" for e in cfg.edges)
        assert cfg.output_dir == str(tmp_path / "pretrain" / f"{name}-p7") and cfg.seed == 7
        assert cfg.train.eval_batches == 0 and cfg.data.seq_len == 64  # the whole held-out split
        trained = {n for n, m in cfg.members.items() if m.trainable}
        assert all(cfg.members[n].lr == exp.pretrain_lr for n in trained)
    kd_teacher = pretrain_config(exp, "kd", 7).members["teacher"]
    assert (
        kd_teacher.model == str(tmp_path / "pretrain" / "standalone-p7" / "export" / "teacher")  # the same seed's
        and not kd_teacher.trainable
    )
    decaying = load_config(
        None, ["--alpha_schedule=linear", "--alpha_final=0.1", "--pretrain_steps=40"], ExperimentConfig
    )
    (alpha,) = [e for e in pretrain_config(decaying, "ctcd", 1).edges if e.target == "teacher"]
    assert (alpha.schedule, alpha.weight, alpha.final_weight, alpha.schedule_end) == ("linear", 1.0, 0.1, 1.0)
    ft = finetune_config(exp, MODELS[3], pretrain_seed=2, seed=5)
    assert (
        ft.seed == 5
        and ft.members["model"].model.endswith("pretrain/ctcd-p2/export/teacher")
        and ft.members["model"].lr == exp.finetune_lr
        and ft.output_dir.endswith("finetune/ctcd-teacher-p2-seed5")
    )


def _comparison(a: list[float], b: list[float], higher_is_better: bool = True) -> Comparison:
    mean, low, high = paired(a, b)
    return Comparison("c", "task", "A", "B", higher_is_better, [x - y for x, y in zip(a, b)], mean, low, high)


def test_verdicts_come_from_the_paired_interval():
    import numpy as np
    from scipy import stats

    a, b = [0.80, 0.83, 0.81], [0.78, 0.805, 0.792]
    mean, low, high = paired(a, b)
    d = np.subtract(a, b)  # the t-interval by hand: mean +- t(0.975, n-1) * sd / sqrt(n)
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    assert mean == pytest.approx(d.mean()) and (low, high) == pytest.approx((d.mean() - half, d.mean() + half))
    assert _comparison(a, b).verdict == "holds"  # about +2 points at every seed
    assert _comparison(b, a).verdict == "reversed"
    # paired: a constant lead survives seed-to-seed swings that an unpaired comparison would call noise
    assert _comparison([0.70, 0.80, 0.90], [0.69, 0.79, 0.885]).verdict == "holds"
    assert _comparison([0.70, 0.80, 0.90], [0.72, 0.77, 0.90]).verdict == "within noise"
    assert _comparison([2.1, 2.2, 2.0], [2.3, 2.4, 2.25], higher_is_better=False).verdict == "holds"  # a loss
    assert _comparison([0.9], [0.1]).verdict == "one pre-training seed: no interval"


def test_quick_experiment_produces_table_json_and_plot(tmp_path):
    """Two pre-training seeds x two fine-tuning seeds through the launcher: every stage, the table, the paired
    comparisons with their intervals, the plot; a second call skips every finished stage."""
    out = tmp_path / "experiment"
    args = [
        "bash",
        "launchers/reproduce.sh",
        f"MASTER_PORT={free_port()}",
        "--quick=true",
        "--pretrain_seeds=[1,2]",
        "--seeds=[1,2]",
        f"--output_dir={out}",
    ]
    result = run_cli(args, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (out / "results.md").read_text()
    for model in MODELS:
        assert f"| {model.label} |" in report
    for claim in (
        "(1) the larger model gains from the smaller: CTCD teacher vs standalone teacher",
        "(2) the CTCD student beats the one-way-KD student: CTCD student vs KD student",
    ):
        for metric in ("held-out MLM loss", "masked-token accuracy", "dev accuracy"):
            assert any(
                line.startswith(f"| {claim} | {metric}") or (claim in line and metric in line)
                for line in report.splitlines()
            ), (claim, metric)
    assert "| standalone teacher |" in result.stdout  # the table is printed at the end
    data = json.loads((out / "results.json").read_text())
    rows = data["rows"]
    assert len(rows) == len(MODELS) and all(
        r["pretrain_seeds"] == [1, 2] and [len(s) for s in r["scores"]] == [2, 2] and len(r["mlm_loss"]) == 2
        for r in rows
    )
    assert all(c["low"] <= c["mean"] <= c["high"] for c in data["comparisons"])
    assert {c["verdict"] for c in data["comparisons"]} <= {"holds", "reversed", "within noise"}
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = run_cli(args, timeout=600)  # finished stages are skipped, the report is rebuilt
    assert again.returncode == 0 and again.stdout.count("done already, skipped") == 8
    assert "[experiment] fine-tune" not in again.stdout
