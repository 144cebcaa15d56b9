"""Joint checkpoints of every engine of a run, the decision of when to save, and which one to resume from.

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

Resuming (:func:`resume_point`) verifies the checkpoint ``latest`` names against its manifest; a damaged or
missing one gives a warning and the newest intact older checkpoint instead. ``keep_last`` counts the checkpoint
``latest`` names and those older than it; newer ones (an abandoned future after resuming from an older step)
are left alone.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

from ctcd_ds import dist
from ctcd_ds.errors import UserError
from ctcd_ds.layout import (
    CONFIG_FILE,
    LATEST,
    MANIFEST_FILE,
    STATE_FILE,
    STEP_PREFIX,
    checkpoints,
    checkpoints_dir,
    is_checkpoint,
    step_of,
    tag,
)

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
CHUNK = 8 << 20  # bytes read at a time when hashing
PROBE_BYTES = 1 << 20  # written to tell a full disk behind torch's zip writer errors
HASH_THREADS = 8  # files hashed at once (hashlib lets go of the GIL): a checkpoint holds a file per rank and member


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


# --------------------------------------------------------------------------------------------------
# files on disk: synced writes, the manifest and its verification


def _staging(root: Path, step: int) -> Path:
    return root / f".{tag(step)}.tmp"


def _aside(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def _pointer_tmp(root: Path) -> Path:
    return root / f".{LATEST}.tmp"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _sha256(path: Path, fsync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
        if fsync:  # on the way: the pages of a file another rank wrote reach the disk too
            os.fsync(f.fileno())
    return digest.hexdigest()


def _sha256_all(paths: list[Path], fsync: bool = False) -> list[str]:
    with ThreadPoolExecutor(max_workers=max(1, min(HASH_THREADS, len(paths), os.cpu_count() or 1))) as pool:
        return list(pool.map(lambda path: _sha256(path, fsync), paths))


def write_manifest(folder: Path) -> None:
    """Size and sha256 of every file under ``folder`` into its ``manifest.json``; every file and folder is
    fsynced (rank 0, once every rank's files exist)."""
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p != folder / MANIFEST_FILE)
    files = {
        path.relative_to(folder).as_posix(): {"size": path.stat().st_size, "sha256": digest}
        for path, digest in zip(paths, _sha256_all(paths, fsync=True))
    }
    _write_synced(folder / MANIFEST_FILE, json.dumps({"version": 1, "files": files}, indent=1))
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        _fsync_dir(sub)
    _fsync_dir(folder)


def damage(folder: Path | str) -> list[str] | None:
    """What is wrong with checkpoint ``folder`` by its manifest, one ``<file>: <what>`` line per damaged file;
    [] when intact, None when it has no manifest (written before checkpoints had one). Sizes are checked
    first; checksums only when every size is right."""
    folder = Path(folder)
    manifest = folder / MANIFEST_FILE
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
        expected = {rel: (int(entry["size"]), str(entry["sha256"])) for rel, entry in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return [f"{manifest}: unreadable ({exc})"]
    problems = []
    for rel, (size, _) in expected.items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif (actual := path.stat().st_size) != size:
            problems.append(f"{path}: truncated or overwritten ({actual} bytes, {MANIFEST_FILE} says {size})")
    if problems:
        return problems
    actual = _sha256_all([folder / rel for rel in expected])
    return [
        f"{folder / rel}: contents changed (its sha256 differs from {MANIFEST_FILE})"
        for (rel, (_, digest)), found in zip(expected.items(), actual)
        if found != digest
    ]


def _verified(folder: Path) -> list[str]:
    """:func:`damage`, with a one-line note for a checkpoint without manifest (accepted unverified)."""
    problems = damage(folder)
    if problems is None:
        dist.print0(f"note: {folder} has no {MANIFEST_FILE} (written before checkpoints had one); using it unverified")
        return []
    return problems


def disk_full(exc: BaseException, probe_dir: Path) -> bool:
    """Whether a failed write ran out of space (ENOSPC) or quota (EDQUOT). ``torch.save``'s zip writer reports a
    full disk as a RuntimeError without errno (``inline_container.cc ... unexpected pos`` or ``file write
    failed``); then a small probe write into ``probe_dir`` tells."""
    seen: BaseException | None = exc
    for _ in range(8):  # the exception and what it was raised from
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno in NO_SPACE:
            return True
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    if not (isinstance(exc, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text)):
        return False
    probe = Path(probe_dir) / f".space_probe_{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            left = memoryview(bytes(PROBE_BYTES))
            while left:
                left = left[os.write(fd, left) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as probe_error:
        return probe_error.errno in NO_SPACE
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
    return False


# --------------------------------------------------------------------------------------------------
# which checkpoint to resume from


def _older_intact(root: Path, candidates: list[Path], reason: str, name: str | None) -> Path:
    """The newest intact checkpoint of ``candidates`` (oldest first), with a warning; else UserError."""
    damaged = []
    for candidate in reversed(candidates):
        problems = _verified(candidate)
        if not problems:
            before = f"older than {name}" if name else "there is"
            dist.print0(f"warning: {reason}; resuming from {candidate}, the newest intact checkpoint {before}")
            return candidate
        dist.print0(f"warning: checkpoint {candidate.name} is damaged too: {'; '.join(problems)}")
        damaged += problems
    raise UserError(
        [f"checkpoint.resume=auto: {line}" for line in damaged]
        + [
            f"checkpoint.resume=auto: {reason}, and no older intact checkpoint is left in {root}; restore one, name "
            "one with checkpoint.resume=PATH, or start afresh in another output_dir"
        ]
    )


def _auto(output_dir: Path) -> Path | None:
    root = checkpoints_dir(output_dir)
    pointer = root / LATEST
    found = checkpoints(output_dir)
    if not pointer.is_file():
        if not found:
            return None  # a new run
        reason = f"{pointer} is missing although {root} holds {', '.join(c.name for c in found)}"
        return _older_intact(root, found, reason, None)
    name = pointer.read_text().strip()
    named = root / name
    if is_checkpoint(named):
        problems = _verified(named)
        if not problems:
            return named
        reason = f"checkpoint {name} (named by {pointer}) is damaged: {'; '.join(problems)}"
    else:
        reason = f"{pointer} names {name}, which is {'incomplete' if named.exists() else 'missing'}"
    limit = step_of(name)
    older = [c for c in found if limit is None or step_of(c) < limit]
    return _older_intact(root, older, reason, name)


def _explicit(path: Path) -> Path:
    if not is_checkpoint(path):
        raise UserError(f"checkpoint.resume={path}: not a checkpoint directory (one with {STATE_FILE})")
    problems = _verified(path)
    if problems:
        raise UserError([f"checkpoint.resume={path}: {line}" for line in problems])
    return path


def resume_point(output_dir: Path | str, resume: str = "auto") -> Path | None:
    """The checkpoint a run resumes from, for ``checkpoint.resume`` = ``resume``; None to start afresh.

    ``auto``: the checkpoint ``checkpoints/latest`` names, verified against its manifest (sizes, sha256); when
    it is damaged or missing, a warning and the newest intact checkpoint older than it; UserError naming the
    damaged files when none is left. No checkpoint at all: None. ``never``: None. A path: that checkpoint,
    verified (UserError when damaged). Checkpoints written before manifests are taken with a one-line note.

    Collective when distributed (every rank calls it): rank 0 reads and hashes, every rank gets its answer.
    Writes nothing."""
    if resume == "never":
        return None
    answer: tuple[str, Any] | None = None
    error: BaseException | None = None
    if dist.is_rank0():
        try:
            found = _auto(Path(output_dir)) if resume == "auto" else _explicit(Path(resume))
            answer = ("path", str(found) if found is not None else None)
        except UserError as exc:
            answer, error = ("problems", exc.problems), exc
        except Exception as exc:  # a bug or an unreadable disk: rank 0 raises it, the others a line about it
            answer, error = ("failed", repr(exc)), exc
    kind, value = dist.broadcast_object(answer)
    if error is not None:
        raise error
    if kind == "problems":
        raise UserError(value)
    if kind == "failed":
        raise RuntimeError(f"finding the checkpoint to resume from failed on rank 0: {value}")
    return Path(value) if value is not None else None


# --------------------------------------------------------------------------------------------------
# resuming on another number of ranks: DeepSpeed universal checkpoints, the loader position


def saved_world_size(path: Path | str) -> int:
    """How many ranks wrote checkpoint ``path``: its trainer state's ``world_size``, else one ``rng_rank*.pt``
    per rank (checkpoints written before the state recorded it)."""
    path = Path(path)
    try:
        recorded = json.loads((path / STATE_FILE).read_text()).get("world_size")
    except (OSError, ValueError):
        recorded = None
    return int(recorded) if recorded else len(list(path.glob("rng_rank*.pt")))


def needs_universal(path: Path | str, zero_stage: int) -> bool:
    """Whether resuming ``path`` on this world size needs a universal checkpoint: ZeRO 1-3 partition optimizer
    state (and under ZeRO-3 the weights) by rank, so a different world size cannot load the rank files;
    stage 0 keeps every state whole on every rank."""
    saved = saved_world_size(path)
    return zero_stage > 0 and saved > 0 and saved != dist.world_size()


def _to_universal(member_dir: Path, out: Path) -> None:
    """DeepSpeed's ds_to_universal on one member's checkpoint folder (in-process, serially: no worker
    processes forked from a distributed rank). ``inject_missing_state``: our engines do not record the
    Megatron-style ``universal_checkpoint_info`` the converter asserts on; an empty one (no tensor-parallel
    patterns) is right for data parallelism only."""
    args = argparse.Namespace(
        input_folder=str(member_dir),
        output_folder=str(out),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    ds_to_universal(args)


def _base_param_groups(engine: Any) -> list[dict[str, Any]]:
    """The param groups of an engine's torch optimizer (inside DeepSpeed's ZeRO wrapper); [] when it has none."""
    optimizer = getattr(engine, "optimizer", None)
    optimizer = getattr(optimizer, "optimizer", optimizer)
    return list(getattr(optimizer, "param_groups", []) or [])


def prepare_universal(path: Path, members: list[str], dest: Path) -> Path:
    """``dest`` holding a DeepSpeed universal checkpoint of every member of checkpoint ``path``, converted by
    rank 0 (into a staging folder renamed when complete; the checkpoint itself is only read). Collective: the
    other ranks wait for it inside ``deepspeed.collective_timeout_s``."""
    staging = dest.with_name(dest.name + ".tmp")
    failure: str | None = None
    if dist.is_rank0():
        try:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            for name in members:
                print(
                    f"converting {path / name} to a universal checkpoint (resuming on another world size)", flush=True
                )
                _to_universal(path / name, staging / name)
            shutil.rmtree(dest, ignore_errors=True)
            os.rename(staging, dest)
        except Exception as exc:  # every rank stops with it (the others would wait forever)
            shutil.rmtree(staging, ignore_errors=True)
            failure = f"{type(exc).__name__}: {exc}"
    failure = dist.broadcast_object(failure)  # also the barrier: the others wait for the conversion
    if failure is not None:
        raise UserError(
            f"checkpoint.resume={path}: written on {saved_world_size(path)} ranks, resumed on {dist.world_size()}; "
            f"converting it to a DeepSpeed universal checkpoint failed: {failure}"
        )
    return dest


def map_loader_position(
    state: dict[str, int], old_batch: int, old_world: int, new_batch: int, new_world: int
) -> tuple[dict[str, int], str | None]:
    """The loader position (epoch, batches consumed per rank) of a checkpoint for another batch per rank or world
    size. The distributed sampler deals one epoch's permutation round-robin, so after ``index`` batches the ranks
    together consumed exactly its first ``index * old_batch * old_world`` samples, whatever the world size; the
    new index covers the same samples when that count is a multiple of ``new_batch * new_world``. Otherwise it
    rounds down (at most one global batch of samples is seen twice, none skipped) and says so."""
    consumed = int(state["index"]) * old_batch * old_world
    per_batch = new_batch * new_world
    index, left = divmod(consumed, per_batch)
    note = None
    if left:
        note = (
            f"{consumed} samples of epoch {state['epoch']} were consumed ({state['index']} batches x {old_batch} x "
            f"{old_world} ranks), not a multiple of {new_batch} x {new_world} ranks; resuming at batch {index}: "
            f"{left} samples are seen twice"
        )
    return {**state, "epoch": int(state["epoch"]), "index": index}, note


# --------------------------------------------------------------------------------------------------
# saving and loading


class Checkpointer:
    """Saves and restores all engines, loader position and RNG together; decides when to save."""

    def __init__(self, output_dir: Path, every: int, keep_last: int):
        self.output_dir = Path(output_dir)
        self.root = checkpoints_dir(output_dir)
        self.every, self.keep_last = every, keep_last

    def save(
        self, step: int, engines: dict[str, Any], trainer_state: dict[str, Any], config_yaml: str, *, last_step: bool
    ) -> Path | None:
        """Save if one is due at ``step`` (every ``every`` steps, and the last one); return its path, else None.

        Collective: every rank must call it (DeepSpeed's ``save_checkpoint`` hangs otherwise). A full disk raises
        UserError on every rank, with ``latest`` left on the last good checkpoint and no partial folder."""
        if not (last_step or (self.every > 0 and step % self.every == 0)):
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
        _write_synced(pointer_tmp, final.name)
        aside = _aside(final)
        if final.exists():  # a folder of this step from before a rollback: kept until the new one is in place
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(final, aside)
        os.rename(staging, final)
        _fsync_dir(self.root)
        os.replace(pointer_tmp, self.root / LATEST)  # the checkpoint counts only from here on
        _fsync_dir(self.root)
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
            groups = _base_param_groups(engine) if universal else []
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
