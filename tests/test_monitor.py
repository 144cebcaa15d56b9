"""What a run logs: TensorBoard across resumes and restarts, DeepSpeed's csv_monitor and wandb blocks fed with
every member's scalars, and the end-of-run summary."""

from __future__ import annotations

import csv
import importlib.machinery
import json
import shutil
import sys
import types
from collections import Counter
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from ctcd_ds import ds_config, layout
from ctcd_ds.config import load_config
from ctcd_ds.errors import UserError

from conftest import run


def _template(tmp_path: Path, **blocks) -> Path:
    tmpl = json.loads(ds_config.template_path("zero2").read_text()) | blocks
    path = tmp_path / "zero2_monitored.json"
    path.write_text(json.dumps(tmpl))
    return path


def _scalars(tb_dir: Path) -> dict[str, list[int]]:
    """The steps of every scalar tag, as TensorBoard shows them (purges applied)."""
    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _raw_events(tb_dir: Path) -> Counter:
    """(tag, step) of every scalar event in every event file, purges not applied."""
    seen: Counter = Counter()
    for path in tb_dir.glob("events.out.tfevents.*"):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                seen[(value.tag, event.step)] += 1
    return seen


def test_resume_keeps_the_checkpoint_steps_scalars_and_drops_what_followed(tiny, tmp_path):
    template = _template(tmp_path, csv_monitor={"enabled": True, "output_path": str(tmp_path / "csv"), "job_name": "j"})
    overrides = [*tiny, f"--deepspeed.template={template}"]
    _, run_dir = run(overrides)
    shutil.rmtree(layout.checkpoints_dir(run_dir) / layout.tag(6))  # as if the run had died after step 6's logs
    run(overrides)  # resumes at step 3 and trains 4..6 again
    scalars = _scalars(run_dir / "tensorboard")
    assert scalars["eval/teacher/mlm_loss"] == [3, 6]  # the step-3 evaluation belongs to the checkpoint: kept
    assert scalars["teacher/total_loss"] == [1, 2, 3, 4, 5, 6]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(3) == 2 and steps.count(4) == 1  # train + eval at 3
    rows = list(csv.reader((tmp_path / "csv" / "j_teacher" / "total_loss.csv").read_text().splitlines()))
    assert rows == [["step", "total_loss"], *([str(s), rows[s][1]] for s in range(1, 7))]


def test_a_restart_before_the_first_checkpoint_starts_the_curves_afresh(tiny, capsys):
    _, run_dir = run(tiny)
    shutil.rmtree(layout.checkpoints_dir(run_dir))  # as if it had died before its first checkpoint
    run(tiny)
    assert "removed 1 TensorBoard event file(s) of an earlier attempt" in capsys.readouterr().out
    raw = _raw_events(run_dir / "tensorboard")
    assert raw[("teacher/total_loss", 1)] == 1 and max(raw.values()) == 1  # nothing twice, in any file
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_csv_monitor_gets_every_members_scalars_in_its_own_job(tiny, tmp_path):
    template = _template(tmp_path, csv_monitor={"enabled": True, "job_name": "pair"})
    summary, run_dir = run([*tiny, f"--deepspeed.template={template}", "--train.steps=3"])
    root = run_dir / "csv_monitor"  # output_path empty: inside the run
    files = {str(p.relative_to(root)) for p in root.rglob("*.csv")}
    for member in ("teacher", "student"):
        for name in ("total_loss", "mlm_loss", "lr", "eval_mlm_loss", "eval_accuracy"):
            assert f"pair_{member}/{name}.csv" in files, (member, name, sorted(files))
    assert "pair/perf_tokens_per_s.csv" in files and "pair/edge_teacher->student_weight.csv" in files
    assert not [f for f in files if "Train_Samples" in f]  # the engines' own lr-only monitor is off
    rows = list(csv.reader((root / "pair_student" / "kd_loss_from_teacher.csv").read_text().splitlines()))
    assert rows[0] == ["step", "kd_loss_from_teacher"] and [r[0] for r in rows[1:]] == ["1", "2", "3"]
    logged = {m["step"]: m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    assert float(rows[2][1]) == pytest.approx(logged[2]["student/kd_loss_from_teacher"])


@pytest.fixture
def fake_wandb(monkeypatch):
    """A stand-in for the wandb package that records what DeepSpeed's WandbMonitor sends it."""
    calls: dict[str, list] = {"init": [], "log": []}
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    module.init = lambda **kw: calls["init"].append(kw)
    module.log = lambda data, step=None, commit=None: calls["log"].append((step, data))
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


def test_wandb_monitor_gets_every_members_scalars_in_one_run(fake_wandb, tiny, tmp_path):
    template = _template(tmp_path, wandb={"enabled": True, "project": "ctcd", "group": "pair"})
    run([*tiny, f"--deepspeed.template={template}", "--train.steps=2"])
    assert fake_wandb["init"] == [{"project": "ctcd", "group": "pair", "entity": None}]  # one run, not one per engine
    logged = {(step, tag) for step, data in fake_wandb["log"] for tag in data}
    for tag in ("teacher/total_loss", "student/total_loss", "eval/student/mlm_loss", "perf/tokens_per_s"):
        assert (2, tag) in logged, tag
    assert not [tag for _, tag in logged if tag.startswith("Train/")]


def test_monitor_blocks_that_cannot_work_are_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    template = _template(tmp_path, tensorboard={"enabled": True}, wandb={"enabled": True})
    with pytest.raises(UserError) as err:
        ds_config.load_template(str(template))
    problems = " ".join(err.value.problems)
    assert "tensorboard monitor; every member's scalars already go to <output_dir>/tensorboard" in problems
    assert "needs the wandb package (pip install wandb)" in problems
    cfg = load_config(None, [f"--deepspeed.template={_template(tmp_path, csv_monitor={'enabled': True})}"])
    engine = ds_config.engine_config(
        cfg.deepspeed.template, micro_batch_size=2, grad_accum_steps=1, grad_clip=1.0, trainable=True, precision="fp32"
    )
    assert "csv_monitor" not in engine
