"""Joint checkpoints of every engine of a run, and the decision of when to save them.

Layout under ``<output_dir>/checkpoints``::

    step_00000100/
        teacher/  student/        DeepSpeed ``save_checkpoint`` of each trainable member (tag = member)
        rng_rank00000.pt ...      every rank's RNG states (python, numpy, torch, accelerator)
        trainer_state.json        step, loader position, member names
        config.yaml               the resolved run config
        manifest.json             size and sha256 of every other file, written after them
    latest                        name of the newest complete checkpoint, moved last

Saving never writes into an existing checkpoint folder. Every rank writes into ``.step_00000100.tmp``; once all
have (a collective), rank 0 adds the trainer state, config and manifest, fsyncs every file and folder, renames
the folder to ``step_00000100`` (a folder of that step from before a rollback is first moved aside to
``.step_00000100.old``, and removed once the new one is in place) and moves ``latest`` to it. A checkpoint is
complete once ``latest`` names it: a crash mid-save leaves only the temporary folder (the next save removes it)
and the previous checkpoint in charge; a full disk stops the run with one line and the same guarantee.

Which checkpoint to resume from, and resuming on another world size: :mod:`ctcd_ds.resume`. The manifest and
synced writes: :mod:`ctcd_ds.integrity`.
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
from ctcd_ds.integrity import disk_full, fsync_dir, write_manifest, write_synced
from ctcd_ds.layout import CONFIG_FILE, LATEST, STATE_FILE, STEP_PREFIX, checkpoints, checkpoints_dir, step_of, tag
from ctcd_ds.resume import base_param_groups, prepare_universal


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


def _staging(root: Path, step: int) -> Path:
    return root / f".{tag(step)}.tmp"


def _aside(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def _pointer_tmp(root: Path) -> Path:
    return root / f".{LATEST}.tmp"


class Checkpointer:
    """Saves and restores all engines, loader position and RNG together; decides when to save."""

    def __init__(self, output_dir: Path, every: int, keep_last: int):
        self.output_dir = Path(output_dir)
        self.root = checkpoints_dir(output_dir)
        self.every, self.keep_last = every, keep_last

    def due(self, step: int, *, last_step: bool) -> bool:
        """Whether a checkpoint is saved at ``step``: every ``every`` steps, and at the last one."""
        return last_step or (self.every > 0 and step % self.every == 0)

    def save(
        self, step: int, engines: dict[str, Any], trainer_state: dict[str, Any], config_yaml: str, *, last_step: bool
    ) -> Path | None:
        """Save if one is due at ``step`` (every ``every`` steps, and the last one); return its path, else None.

        Collective: every rank must call it (DeepSpeed's ``save_checkpoint`` hangs otherwise). A full disk raises
        UserError on every rank, with ``latest`` left on the last good checkpoint and no partial folder."""
        if not self.due(step, last_step=last_step):
            return None
        final, staging = self.root / tag(step), _staging(self.root, step)
        failure = None
        if dist.is_rank0():
            try:
                self.remove_leftovers()
                staging.mkdir(parents=True)
            except Exception as exc:
                failure = exc
        self._check(step, staging, failure, dist.broadcast_object(self._kind(failure, self.root)))

        failure = None
        try:
            for name, engine in engines.items():
                engine.save_checkpoint(str(staging), tag=name, save_latest=False)
            torch.save(_rng_state(), staging / f"rng_rank{dist.rank():05d}.pt")
        except Exception as exc:
            failure = exc
        # every rank learns whether any failed (and whether of a full disk): also the barrier after all files exist
        kind = self._kind(failure, staging)
        failed, full = dist.all_reduce_sum(torch.tensor([float(kind is not None), float(kind == "full")])).tolist()
        self._check(step, staging, failure, None if not failed else "full" if full else "failed")

        failure = None
        if dist.is_rank0():
            try:
                self._publish(step, staging, final, trainer_state, config_yaml)
            except Exception as exc:
                failure = exc
        self._check(step, staging, failure, dist.broadcast_object(self._kind(failure, self.root)))
        return final

    @staticmethod
    def _kind(failure: BaseException | None, probe_dir: Path) -> str | None:
        if failure is None:
            return None
        return "full" if disk_full(failure, probe_dir if probe_dir.is_dir() else probe_dir.parent) else "failed"

    def _check(self, step: int, staging: Path, failure: BaseException | None, kind: str | None) -> None:
        """Every rank, after a collective that told it ``kind`` (None: all went well): on a failure rank 0 removes
        the temporary folder, then a full disk raises one UserError line, another failure its own exception."""
        if kind is None:
            return
        if dist.is_rank0():
            shutil.rmtree(staging, ignore_errors=True)
            _pointer_tmp(self.root).unlink(missing_ok=True)
        pointer = self.root / LATEST
        current = pointer.read_text().strip() if pointer.is_file() else "no checkpoint (none was written yet)"
        if kind == "full":
            where = getattr(failure, "filename", None) or self.root
            raise UserError(
                f"no space left on device at {where} while writing checkpoint step {step}; latest still names "
                f"{current}; free some space and run the same command again to resume from it"
            ) from failure
        if failure is not None:
            raise failure
        raise RuntimeError(f"writing checkpoint step {step} failed on another rank (see its error); latest: {current}")

    def _publish(self, step: int, staging: Path, final: Path, trainer_state: dict[str, Any], config_yaml: str) -> None:
        """Rank 0, once every rank's files exist: write the rest, then rename into place and move ``latest``."""
        # everything that takes space first, so that a full disk stops the save before anything moves
        (staging / CONFIG_FILE).write_text(config_yaml)
        (staging / STATE_FILE).write_text(json.dumps({"step": step, **trainer_state}, indent=2))
        write_manifest(staging)
        pointer_tmp = _pointer_tmp(self.root)
        write_synced(pointer_tmp, final.name)
        aside = _aside(final)
        if final.exists():  # a folder of this step from before a rollback: kept until the new one is in place
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(final, aside)
        os.rename(staging, final)
        fsync_dir(self.root)
        os.replace(pointer_tmp, self.root / LATEST)  # the checkpoint counts only from here on
        fsync_dir(self.root)
        shutil.rmtree(aside, ignore_errors=True)
        self._prune(step)

    def remove_leftovers(self) -> None:
        """Rank 0, with the output directory to itself (the run lock held): remove what a save that did not
        finish left (``.step_N.tmp``); put back a ``.step_N.old`` whose replacement never arrived."""
        if not self.root.is_dir():
            return
        for tmp in sorted(self.root.glob(f".{STEP_PREFIX}*.tmp")):
            shutil.rmtree(tmp, ignore_errors=True)
            dist.print0(f"note: removed {tmp}, left by a checkpoint save that did not finish")
        for old in sorted(self.root.glob(f".{STEP_PREFIX}*.old")):
            final = self.root / old.name[1 : -len(".old")]
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(old, final)
                dist.print0(f"note: put back {final}, moved aside by a checkpoint save that did not finish")
        _pointer_tmp(self.root).unlink(missing_ok=True)

    def _prune(self, latest_step: int) -> None:
        """Keep ``keep_last`` checkpoints counting the one ``latest`` names (step ``latest_step``) and those older
        than it; never touch newer ones (an abandoned future after resuming from an older step)."""
        if self.keep_last <= 0:
            return
        older = [c for c in checkpoints(self.output_dir) if step_of(c) < latest_step]
        for old in older[: max(len(older) - (self.keep_last - 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, engines: dict[str, Any], *, universal: bool = False) -> dict[str, Any]:
        """Restore every engine (weights, optimizer, lr schedule) and this rank's RNG; return the trainer state.

        ``universal``: the checkpoint was written on another world size; the engines (built with DeepSpeed's
        ``checkpoint.load_universal``) load a universal copy converted into this run's checkpoints folder
        (removed once loaded), and the RNG is left to the caller (no rank of the old run matches one of this)."""
        load_dir = prepare_universal(path, list(engines), self.root / f".universal-{path.name}") if universal else path
        for name, engine in engines.items():
            groups = base_param_groups(engine) if universal else []
            kept = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in groups]
            loaded, _ = engine.load_checkpoint(
                str(load_dir), tag=name, load_optimizer_states=True, load_lr_scheduler_states=True
            )
            for group, hyper in zip(groups, kept):
                # DeepSpeed 0.19's ZeRO-3 universal load gives every group group 0's hyperparameters (the
                # no-decay group would get weight decay); they come from the run config anyway
                group.update(hyper)
            if loaded is None:
                raise UserError(f"checkpoint.resume={path}: it holds no checkpoint of member '{name}'")
        if universal:
            dist.barrier()
            if dist.is_rank0():
                shutil.rmtree(load_dir, ignore_errors=True)
            return json.loads((path / STATE_FILE).read_text())
        rng_file = path / f"rng_rank{dist.rank():05d}.pt"
        if rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            dist.print0(
                f"warning: {rng_file.name} missing (resuming on a different number of ranks?); RNG not restored"
            )
        return json.loads((path / STATE_FILE).read_text())
