"""Smoke tests of the benchmark scripts: each runs in ``--quick`` mode as a subprocess and prints its table."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from conftest import DIST_ENV, REPO


def run_benchmark(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python benchmarks/<script> <args>`` from the repository root, outside any distributed world (no
    RANK/WORLD_SIZE/MASTER_* variables inherited from in-process runs), output captured as text."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV and not k.startswith("MASTER_")}
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        check=False,  # the test reads the exit status itself
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def table_rows(stdout: str) -> dict[str, list[str]]:
    """{method: [its table lines]} from a table of ``N V method ...`` lines."""
    rows: dict[str, list[str]] = {}
    for line in stdout.splitlines():
        m = re.match(r"\s*\d+\s+\d+\s+(\w+)\s+[\d.]+\s", line)
        if m:
            rows.setdefault(m.group(1), []).append(line)
    return rows


def test_kd_loss_benchmark_quick():
    res = run_benchmark("kd_loss.py", "--quick")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = table_rows(res.stdout)
    # the fused loss, the naive and the careful torch baseline, and the LM-head pair, at each quick shape
    shapes = len(rows.get("fused", []))
    assert shapes >= 1, res.stdout
    for method in ("reference", "torch_shared_lsm", "copy_floor", "head_reference", "head_fused"):
        assert len(rows.get(method, [])) == shapes, (method, res.stdout)
    assert "fastest baseline" in res.stdout
    assert '"speedup_vs_fastest_baseline"' in res.stdout.splitlines()[-1]  # the JSON summary


def test_step_benchmark_quick(tokenizer_dir):
    """benchmarks/step.py through the real Trainer and co-training step: CTCD, the reference loss, each member alone."""
    res = run_benchmark("step.py", "--quick", f"--tokenizer.path={tokenizer_dir}", timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    names = [
        line.split()[0]
        for line in res.stdout.splitlines()
        if re.match(r"(ctcd|ctcd_ref|teacher|student)\s+[\d.]+\s+\d+$", line)
    ]
    assert names == ["ctcd", "ctcd_ref", "teacher", "student"], res.stdout
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["ctcd_over_separate"] > 0 and summary["kd_loss"] == "fused"


def test_finetune_lr_sweep_quick(tmp_path, tokenizer_dir):
    from transformers import BertConfig, BertForMaskedLM

    from ctcd_ds.tokenizer import load_tokenizer, save_tokenizer

    model = tmp_path / "mlm"
    config = BertConfig(
        vocab_size=1000, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    BertForMaskedLM(config).save_pretrained(model)
    save_tokenizer(load_tokenizer(tokenizer_dir), model)
    args = ["--quick", "--models", f"tiny={model}", "--lrs", "1e-3", "3e-4", "--out", str(tmp_path / "sweep")]
    res = run_benchmark("finetune_lr_sweep.py", *args, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert re.search(r"^\s+1e-3\s+[\d.]+$", res.stdout, re.M) and re.search(r"^\s+3e-4\s+[\d.]+$", res.stdout, re.M)
    assert "majority-class baseline (dev accuracy):" in res.stdout and "best lr for tiny: " in res.stdout


def test_zero_memory_prints_each_stage_against_zero0(tmp_path):
    """The ZeRO memory benchmark on the tiny pair, 2 ranks, two stages: one line per stage, ZeRO-0 at 100%."""
    args = ["--recipe", "ctcd", "--templates", "zero0", "zero2", "--steps", "3", "--seq-len", "64", "--vocab", "1000"]
    res = run_benchmark("zero_memory.py", *args, "--out", str(tmp_path / "zm"), timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = {line.split()[0]: line.split() for line in res.stdout.splitlines() if line.startswith("zero")}
    assert sorted(lines) == ["zero0", "zero2"], res.stdout[-2000:]
    assert lines["zero0"][1:5:2] == ["0", "100%"] and lines["zero2"][1] == "2"
    assert float(lines["zero2"][2]) < float(lines["zero0"][2])  # the partitioned state is smaller


def test_profile_step_quick(tmp_path, tokenizer_dir):
    """benchmarks/profile_step.py: the step's record_function phases come out of the profiler, every one of them."""
    out = tmp_path / "profile"
    res = run_benchmark(
        "profile_step.py", "--quick", f"--tokenizer.path={tokenizer_dir}", "--out", str(out), timeout=600
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((out / "profile.json").read_text())
    expected = {f"{m}/{p}" for m in ("teacher", "student") for p in ("forward", "loss", "backward", "optimizer_step")}
    assert set(report["phases"]) == expected | {"kd_loss"}, report["phases"]
    assert all(p["host_ms"] > 0 for p in report["phases"].values())
    assert report["top_ops"] and "teacher/backward" in res.stdout


def test_mfu_ablation_quick(tmp_path, tokenizer_dir):
    """benchmarks/mfu_ablation.py: the defaults, one lever, each member alone; the table and its JSON."""
    out = tmp_path / "ablation"
    args = ["--quick", "--config", "ctcd", f"--tokenizer.path={tokenizer_dir}", "--out", str(out)]
    res = run_benchmark("mfu_ablation.py", *args, "--only", "AdamW not fused", timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((out / "ablation.json").read_text())
    assert list(report["rows"]) == ["defaults", "AdamW not fused"]
    assert all(r["tokens_per_s"] > 0 and r["model_tflops"] > 0 for r in report["rows"].values())
    assert set(report["alone"]) == {"teacher", "student"} and report["ctcd_over_separate"] > 0
    assert "| AdamW not fused |" in (out / "ablation.md").read_text()
