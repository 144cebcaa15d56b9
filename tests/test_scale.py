"""`ctcd-ds scale`: the grid, the efficiencies, bad settings, and a real 1 -> 2 rank sweep through the launcher with a
failing point, a timed-out point and a rerun that keeps what was finished."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import pytest
import torch

from ctcd_ds import dist
from ctcd_ds.config import ScaleConfig, load_config
from ctcd_ds.errors import EXIT_USAGE
from ctcd_ds.scaling import sweep
from ctcd_ds.scaling.grid import command, member_overrides, points
from ctcd_ds.scaling.report import add_efficiencies
from ctcd_ds.scaling.sweep import scale_problems

from conftest import run_cli

LAUNCHER = "launchers/scale.sh"


def _cfg(*overrides: str) -> ScaleConfig:
    return load_config(None, list(overrides), ScaleConfig)


def test_the_grid_is_every_combination_with_names_that_say_what_each_point_is(tmp_path):
    cfg = _cfg(
        "--ranks=[1,2]", "--templates=[zero0,zero3]", "--micro_batch=4", "--seq_len=[64]",
        "--members=[{teacher: tiny-teacher, student: tiny-teacher}]", f"--output_dir={tmp_path}",
    )  # fmt: skip
    grid = points(cfg)
    assert [(p.template, p.world_size) for p in grid] == [("zero0", 1), ("zero0", 2), ("zero3", 1), ("zero3", 2)]
    assert len({p.name for p in grid}) == 4
    assert grid[1].name.startswith("ctcd-n1x2-zero0-mb4-ga1-auto-seq64-m")
    cmd = command(cfg, grid[3], tmp_path / "run")
    assert cmd[:4] == ["bash", cmd[1], "NUM_GPUS=2", "CONFIG=ctcd"] and cmd[1].endswith("launchers/pretrain.sh")
    for flag in ("--deepspeed.template=zero3", "--train.micro_batch_size=4", "--data.seq_len=64", "--export=false",
                 "--members.student.model=tiny-teacher", "--checkpoint.at_end=false"):  # fmt: skip
        assert flag in cmd, flag
    assert not any(a.startswith("HOSTFILE=") for a in cmd)
    assert member_overrides(" a = x ,b=y") == ["--members.a.model=x", "--members.b.model=y"]


def test_weak_and_strong_scaling_efficiency_against_the_one_rank_points():
    def row(world, mb, tps):
        base = {"recipe": "ctcd", "members": "", "template": "zero2", "precision": "fp32", "seq_len": 64}
        return base | {"status": "ok", "world_size": world, "micro_batch": mb, "grad_accum": 1,
                       "tokens_per_s": tps, "tokens_per_s_per_rank": tps / world}  # fmt: skip

    one8, one16, two8 = row(1, 8, 1000.0), row(1, 16, 1200.0), row(2, 8, 1800.0)
    other = row(2, 8, 1500.0) | {"template": "zero3"}  # no 1-rank zero3 point: no efficiency
    failed = {"status": "failed", "world_size": 1}
    add_efficiencies([one8, one16, two8, other, failed])
    assert two8["weak_scaling_efficiency"] == pytest.approx(0.9)  # 900 per rank against 1000
    assert two8["strong_scaling_efficiency"] == pytest.approx(1800 / (2 * 1200))  # global batch 16 on one rank
    assert one8["weak_scaling_efficiency"] == pytest.approx(1.0)
    assert other["weak_scaling_efficiency"] is None and other["strong_scaling_efficiency"] is None
    assert "weak_scaling_efficiency" not in failed


def test_bad_sweep_settings_are_all_reported_before_anything_runs(tmp_path):
    cfg = _cfg(
        f"--output_dir={tmp_path / 'out'}", "--nodes=[1,2]", "--ranks=[0]", "--templates=[zero9]", "--steps=4",
        "--warmup_steps=4", "--recipes=[nope]", "--members=[{}]", "--cpu_threads_per_rank=1", "--micro_batch=[2,2]",
    )  # fmt: skip
    found = "\n".join(scale_problems(cfg))
    for text in ("nodes=[1, 2]: more than one node needs hostfile", "ranks=0: must be at least 1", "zero9",
                 "warmup_steps=4: must be at least 0 and less than steps=4", "--config=nope",
                 "members.0: give at least one member: preset",
                 "cpu_threads_per_rank=1: reaches only this machine's ranks",
                 "two points are both named nope-n1x0-zero9-mb2-ga1-auto: give each value once"):  # fmt: skip
        assert text in found, found
    res = run_cli(["bash", LAUNCHER, f"--output_dir={tmp_path / 'out'}", "--steps=1", "--ranks=[1,two]"])
    assert res.returncode == EXIT_USAGE, res.stderr
    assert "error: steps=1: a point needs at least 2 steps" in res.stderr
    assert "ranks.1: expected an integer, got 'two'" in res.stderr
    assert not (tmp_path / "out").exists()


def _rows(out: Path) -> dict[str, dict]:
    with open(out / "scaling.csv") as f:
        return {r["name"]: r for r in csv.DictReader(f)}


def test_a_real_sweep_measures_each_point_records_failures_and_keeps_finished_points(tmp_path, tokenizer_dir):
    out = tmp_path / "scale"
    tiny = [f"--tokenizer.path={tokenizer_dir}", "--data.seq_len=64", "--data.max_train_blocks=256"]
    args = [
        "bash", LAUNCHER, f"--output_dir={out}", "--ranks=[1,2]", "--micro_batch=[4,400]", "--steps=5",
        "--warmup_steps=2", "--precision=fp32", f"--overrides={json.dumps(tiny)}",
    ]  # fmt: skip
    res = run_cli(args, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = _rows(out)
    assert len(rows) == 4
    ok = {n: r for n, r in rows.items() if r["status"] == "ok"}
    assert sorted(ok) == ["ctcd-n1x1-zero2-mb4-ga1-fp32", "ctcd-n1x2-zero2-mb4-ga1-fp32"]
    one, two = ok["ctcd-n1x1-zero2-mb4-ga1-fp32"], ok["ctcd-n1x2-zero2-mb4-ga1-fp32"]
    assert (one["world_size"], two["world_size"]) == ("1", "2")
    assert int(two["tokens_per_step"]) == 2 * int(one["tokens_per_step"]) == 2 * 4 * 64
    assert int(one["timed_steps"]) == 3 and float(one["step_time_median_s"]) > 0
    assert float(two["weak_scaling_efficiency"]) == pytest.approx(  # the CSV keeps 6 digits
        float(two["tokens_per_s_per_rank"]) / float(one["tokens_per_s"]), rel=1e-4
    )
    assert len(two["peak_memory_gb_per_rank"].split(";")) == 2 and float(two["peak_memory_gb_max"]) > 0.1
    assert "teacher=" in one["members_params"] and float(one["flops_per_token"]) > 0
    assert 0 < float(two["tensors_gb_max"]) < float(two["peak_memory_gb_max"])
    assert one["mfu"] == ""  # a CPU has no known peak
    cores = len(os.sched_getaffinity(0))
    half = max(1, cores // 2)  # CPU ranks split the cores of their node
    assert one["cpu_threads_per_rank"] == str(cores) and two["cpu_threads_per_rank"] == f"{half};{half}"
    for name, r in rows.items():
        if name.startswith("ctcd-n1x") and "mb400" in name:  # 400 blocks per rank: more than the data has
            assert r["status"] == "failed" and "exit status 2" in r["error"] and "micro_batch_size" in r["error"], r
    assert (out / "scaling.png").stat().st_size > 10_000
    assert not any((out / "points").glob("*/run/checkpoints/step_*"))  # points save no checkpoint
    port = re.search(r"--master_port=(\d+)", (out / "points" / two["name"] / "log.txt").read_text()).group(1)
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))  # the ranks removed theirs
    assert "weak eff" in res.stdout and "2 of 4 points failed" in res.stdout

    # Again: finished points (ok or failed) are kept, not run; a timeout is a failed row, not the end of the sweep.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "points").glob("*/result.json")}
    res = run_cli([*args, "--ranks=[1,2,3]", "--timeout_s=3"], timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    rows = _rows(out)
    assert len(rows) == 6
    assert rows["ctcd-n1x3-zero2-mb4-ga1-fp32"]["error"].startswith("timeout: still running after 3 s")


def test_a_point_gets_its_own_environment_and_is_rerun_when_its_settings_change(tmp_path, monkeypatch):
    launched = []

    def launch(cmd, log, timeout_s, env):
        launched.append((cmd, env))
        return "exit status 1: error: something"

    monkeypatch.setattr(sweep, "_launch", launch)
    inherited = {"HOSTFILE": "/etc/hosts", "NUM_NODES": "4", "MASTER_PORT": "1", "OMP_NUM_THREADS": "7", "HOME": "/h"}
    monkeypatch.setattr(os, "environ", inherited)
    cfg = _cfg(f"--output_dir={tmp_path}", "--ranks=2", "--cpu_threads_per_rank=1")
    row = sweep.Sweep(cfg).point(points(cfg)[0])
    cmd, env = launched[-1]
    assert env == {"HOME": "/h", "OMP_NUM_THREADS": "1"} and "NUM_GPUS=2" in cmd  # no launcher setting leaks in
    assert (row["status"], row["error"], row["zero_stage"]) == ("failed", "exit status 1: error: something", 2)
    assert json.loads((tmp_path / "points" / row["name"] / "result.json").read_text()) == row

    sweep.Sweep(cfg).point(points(cfg)[0])  # the same settings: kept (failed points too, without retry_failed)
    assert len(launched) == 1
    for changed in (["--steps=9"], ["--overrides=[--data.seq_len=32]"], ["--cpu_threads_per_rank=0"]):
        again = _cfg(f"--output_dir={tmp_path}", "--ranks=2", "--cpu_threads_per_rank=1", *changed)
        sweep.Sweep(again).point(points(again)[0])
        assert len(launched) == 2, changed  # measured with other settings: run again
        launched.pop()
        sweep.Sweep(cfg).point(points(cfg)[0])  # back to the first settings (their result was replaced)
        launched.pop()


def test_live_tensor_bytes_counts_every_storage_once():
    before = dist.live_tensor_bytes()
    big = torch.zeros(1_000_000)
    views = [big[:10], big.view(1000, 1000), big[5:]]  # views share the one storage
    grown = dist.live_tensor_bytes() - before
    assert grown == pytest.approx(4_000_000, rel=0.01), grown
    del big, views
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():  # what torch.compile leaves in memory after tracing: no storage of its own
        fake = torch.zeros(1_000_000)
    assert dist.live_tensor_bytes() == pytest.approx(before, rel=0.01) and fake.shape == (1_000_000,)
