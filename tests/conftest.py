"""Shared fixtures: a tiny tokenizer trained once, and tiny run overrides that keep every run fast."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from the hub in tests
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]

# In-process runs (``run`` below) join a 1-process world, which sets these in os.environ; a subprocess
# (launcher, deepspeed) must not inherit them, or it would join that world / rendezvous on its port.
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A 1000-token SentencePiece tokenizer trained on the bundled corpus (through the real code path)."""
    from ctcd_ds.assets import BUNDLED_TRAIN
    from ctcd_ds.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(BUNDLED_TRAIN, out, vocab_size=1000, max_sentences=2000)
    return out


def tiny_overrides(out: Path, tokenizer_dir: Path) -> list[str]:
    """A run of the default CTCD recipe that takes seconds on a CPU: 6 steps, checkpoints at 3 and 6."""
    return [
        f"--output_dir={out}",
        f"--tokenizer.path={tokenizer_dir}",
        "--data.seq_len=64",
        "--data.max_train_blocks=256",
        "--train.micro_batch_size=8",
        "--train.steps=6",
        "--train.log_every=1",
        "--train.eval_every=3",
        "--train.eval_batches=2",
        "--checkpoint.every=3",
        "--checkpoint.keep_last=0",
    ]


@pytest.fixture
def tiny(tmp_path, tokenizer_dir) -> list[str]:
    """:func:`tiny_overrides` into this test's ``tmp_path / 'run'``."""
    return tiny_overrides(tmp_path / "run", tokenizer_dir)


MINI = [
    "--data.seq_len=32",
    "--data.max_train_blocks=64",
    "--train.micro_batch_size=4",
    "--train.steps=2",
    "--train.eval_batches=1",
]
"""A 2-step run of 32-token blocks: for tests that only need a run to exist (add the output and tokenizer)."""


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path, member: str) -> dict[int, float]:
    return {m["step"]: m[f"{member}/total_loss"] for m in read_metrics(run_dir) if f"{member}/total_loss" in m}


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run_cli(
    args: list[str], timeout: int = 600, env: dict | None = None, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    """Run a command (a list) from the repo root and return its completed process (text output)."""
    inherited = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    full_env = {**inherited, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


PYTHON = sys.executable


def run(overrides: list[str], config: str = "ctcd") -> tuple[dict, Path]:
    """Validate and train a config in this process (a 1-rank world), through the real engines."""
    from ctcd_ds import dist
    from ctcd_ds.checks import check
    from ctcd_ds.config import load_config
    from ctcd_ds.trainer import run_pretrain

    cfg = load_config(config, overrides)
    check(cfg)
    dist.init_distributed()
    return run_pretrain(cfg), Path(cfg.output_dir)
