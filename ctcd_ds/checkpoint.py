"""Joint checkpoints of every engine of a run, and the decision of when to save.

Layout under ``<output_dir>/checkpoints``::

    step_00000100/
        teacher/  student/        DeepSpeed ``save_checkpoint`` of each trainable member (tag = member)
        rng_rank00000.pt ...      every rank's RNG states (python, numpy, torch, accelerator)
        trainer_state.json        step, loader position, member names
        config.yaml               the resolved run config
    latest                        name of the newest complete checkpoint, written last

A checkpoint is complete once ``latest`` names it; a crash mid-save leaves the previous one in charge.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctcd_ds import dist

STATE_FILE = "trainer_state.json"
LATEST = "latest"


def root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def is_checkpoint(path: Path) -> bool:
    return (Path(path) / STATE_FILE).is_file()


def latest(output_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    pointer = root(output_dir) / LATEST
    if not pointer.is_file():
        return None
    path = root(output_dir) / pointer.read_text().strip()
    return path if is_checkpoint(path) else None


def tag(step: int) -> str:
    return f"step_{step:08d}"


def _rng_state() -> dict[str, Any]:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if acc.device_name() != "cpu":
        state["accelerator"] = acc.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    from deepspeed.accelerator import get_accelerator

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "accelerator" in state:
        get_accelerator().set_rng_state(state["accelerator"])


class Checkpointer:
    """Saves and restores all engines, loader position and RNG together; decides when to save."""

    def __init__(self, output_dir: Path, every: int, keep_last: int):
        self.root = root(output_dir)
        self.every, self.keep_last = every, keep_last

    def due(self, step: int, last_step: bool) -> bool:
        return last_step or (self.every > 0 and step % self.every == 0)

    def save(self, step: int, engines: dict[str, Any], trainer_state: dict[str, Any], config_yaml: str) -> Path:
        """Collective: every rank must call it (DeepSpeed's ``save_checkpoint`` hangs otherwise)."""
        path = self.root / tag(step)
        for name, engine in engines.items():
            engine.save_checkpoint(str(path), tag=name, save_latest=False)
        torch.save(_rng_state(), path / f"rng_rank{dist.rank():05d}.pt")
        dist.barrier()
        if dist.is_rank0():
            (path / "config.yaml").write_text(config_yaml)
            (path / STATE_FILE).write_text(json.dumps({"step": step, **trainer_state}, indent=2))
            tmp = self.root / f".{LATEST}.tmp"
            tmp.write_text(path.name)
            os.replace(tmp, self.root / LATEST)  # the checkpoint counts only from here on
            self._prune()
        dist.barrier()
        return path

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        done = sorted(p for p in self.root.glob("step_*") if is_checkpoint(p))
        for old in done[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, engines: dict[str, Any]) -> dict[str, Any]:
        """Restore every engine (weights, optimizer, lr schedule) and this rank's RNG; return the trainer state."""
        for name, engine in engines.items():
            loaded, _ = engine.load_checkpoint(str(path), tag=name, load_optimizer_states=True, load_lr_scheduler_states=True)
            if loaded is None:
                raise ValueError(f"checkpoint.resume={path}: it holds no checkpoint of member '{name}'")
        rng_file = path / f"rng_rank{dist.rank():05d}.pt"
        if rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            dist.print0(f"warning: {rng_file.name} missing (resuming on a different number of ranks?); RNG not restored")
        return json.loads((path / STATE_FILE).read_text())
