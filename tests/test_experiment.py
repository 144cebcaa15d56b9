"""The reproduction experiment in --quick mode: every stage runs, the table, JSON and plot have every row."""

from __future__ import annotations

import json

import pytest

from conftest import free_port, run_cli
from ctcd_ds.config import ExperimentConfig, load_config
from ctcd_ds.experiment import MODELS, experiment_problems


def test_bad_experiment_settings_are_named():
    exp = load_config(None, ["--variants=[kd, ctcd, bogus]", "--scale=huge", "--seeds=[]", "--alpha_schedule=zigzag"], root=ExperimentConfig)
    problems = experiment_problems(exp)
    assert any("alpha_schedule=zigzag: must be one of" in p for p in problems)
    assert any("unknown bogus" in p for p in problems)
    assert any("scale=huge" in p for p in problems)
    assert any("include standalone" in p for p in problems)
    assert any(p.startswith("seeds:") for p in problems)


@pytest.mark.parametrize("seeds", ["[1,2]"])
def test_quick_experiment_produces_table_json_and_plot(tmp_path, seeds):
    out = tmp_path / "experiment"
    args = ["bash", "launchers/reproduce.sh", f"MASTER_PORT={free_port()}", "--quick=true", f"--seeds={seeds}", f"--output_dir={out}"]
    result = run_cli(args, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = (out / "results.md").read_text()
    for model in MODELS:
        assert f"| {model.label} |" in table
    assert "(1) CTCD teacher beats the standalone teacher" in table and "(2) CTCD student beats the one-way-KD student" in table
    assert "| standalone teacher |" in result.stdout  # the table is printed at the end
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == len(MODELS) and all(len(r["task_scores"]) == 2 and r["mlm_perplexity"] > 1 for r in rows)
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = run_cli(args, timeout=600)  # finished stages are skipped, the report is rebuilt
    assert again.returncode == 0 and again.stdout.count("done already, skipped") == 4
    assert "[experiment] fine-tune" not in again.stdout
