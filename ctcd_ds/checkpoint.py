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
from deepspeed.accelerator import get_accelerator

from ctcd_ds import dist
from ctcd_ds.errors import UserError
from ctcd_ds.layout import CONFIG_FILE, LATEST, STATE_FILE, checkpoints_dir, is_checkpoint, tag


def _rng_state() -> dict[str, Any]:
    acc = get_accelerator()
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if acc.device_name() != "cpu":
        state["accelerator"] = acc.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "accelerator" in state:
        get_accelerator().set_rng_state(state["accelerator"])


class Checkpointer:
    """Saves and restores all engines, loader position and RNG together; decides when to save."""

    def __init__(self, output_dir: Path, every: int, keep_last: int):
        self.root = checkpoints_dir(output_dir)
        self.every, self.keep_last = every, keep_last

    def save(
        self, step: int, engines: dict[str, Any], trainer_state: dict[str, Any], config_yaml: str, *, last_step: bool
    ) -> Path | None:
        """Save if one is due at ``step`` (every ``every`` steps, and the last one); return its path, else None.

        Collective: every rank must call it (DeepSpeed's ``save_checkpoint`` hangs otherwise)."""
        if not (last_step or (self.every > 0 and step % self.every == 0)):
            return None
        path = self.root / tag(step)
        for name, engine in engines.items():
            engine.save_checkpoint(str(path), tag=name, save_latest=False)
        torch.save(_rng_state(), path / f"rng_rank{dist.rank():05d}.pt")
        dist.barrier()
        if dist.is_rank0():
            (path / CONFIG_FILE).write_text(config_yaml)
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
            loaded, _ = engine.load_checkpoint(
                str(path), tag=name, load_optimizer_states=True, load_lr_scheduler_states=True
            )
            if loaded is None:
                raise UserError(f"checkpoint.resume={path}: it holds no checkpoint of member '{name}'")
        rng_file = path / f"rng_rank{dist.rank():05d}.pt"
        if rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            dist.print0(
                f"warning: {rng_file.name} missing (resuming on a different number of ranks?); RNG not restored"
            )
        return json.loads((path / STATE_FILE).read_text())
