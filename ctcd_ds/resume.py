"""Which checkpoint a run resumes from (verified against its manifest, falling back to the newest intact one),
and resuming on another number of ranks: DeepSpeed universal checkpoints and the loader position."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

from ctcd_ds import dist
from ctcd_ds.errors import UserError
from ctcd_ds.integrity import damage
from ctcd_ds.layout import LATEST, MANIFEST_FILE, STATE_FILE, checkpoints, checkpoints_dir, is_checkpoint, step_of


def _verified(folder: Path) -> list[str]:
    """:func:`damage`, with a one-line note for a checkpoint without manifest (accepted unverified)."""
    problems = damage(folder)
    if problems is None:
        dist.print0(f"note: {folder} has no {MANIFEST_FILE} (written before checkpoints had one); using it unverified")
        return []
    return problems


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

    Collective when distributed (every rank calls it): rank 0 reads and hashes, every rank gets its answer. On
    several nodes it first checks that every node reaches ``output_dir`` (:func:`check_shared`), and then the
    checkpoint found. Leaves nothing behind in ``output_dir``."""
    check_shared(output_dir)
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
    if value is None:
        return None
    missing = _not_on_every_node(lambda: is_checkpoint(value))
    if missing:
        raise UserError(
            f"checkpoint.resume={resume}: rank {missing[0]} (on another node than rank 0) finds no checkpoint at "
            f"{value}; every node must reach it at the same path"
        )
    return Path(value)


# --------------------------------------------------------------------------------------------------
# several nodes: one output directory that every node reaches

SHARED_CHECK_PREFIX = ".shared-check-"
SHARED_WAIT_S = 5.0
"""How long the other nodes look for rank 0's file (a network file system may show it late)."""


def _not_on_every_node(seen: Callable[[], bool]) -> list[int]:
    """Collective: the ranks, each the first of a node other than rank 0's, where ``seen()`` is False."""
    ok = seen() if dist.is_local_rank0() and not dist.is_rank0() else True
    return [r for r, good in enumerate(dist.all_gather_object(ok)) if not good]


def _wait_for(marker: Path, token: str) -> bool:
    deadline = time.monotonic() + SHARED_WAIT_S
    while True:
        try:
            if marker.name in os.listdir(marker.parent) and marker.read_text() == token:  # listdir: no stale entry
                return True
        except OSError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def check_shared(output_dir: Path | str) -> None:
    """Collective, on several nodes (else nothing): every node reaches ``output_dir`` at the same path.

    All ranks write each checkpoint into one folder there, rank 0 completes it, and a resumed run loads from it,
    so the nodes must share it (a cluster file system); nodes that each had their own would write checkpoints
    that cannot be resumed. Rank 0 writes a file with a random token there; the first rank of every other node
    looks for it (for up to :data:`SHARED_WAIT_S`); rank 0 removes it again, and the directories it made for it.
    UserError if a node does not see it."""
    if dist.num_nodes() == 1:
        return
    out = Path(os.path.abspath(output_dir))
    marker = out / f"{SHARED_CHECK_PREFIX}{secrets.token_hex(8)}"
    made = [d for d in (out, *out.parents) if not d.exists()]
    failure = None
    if dist.is_rank0():
        try:
            out.mkdir(parents=True, exist_ok=True)
            marker.write_text(marker.name)
        except OSError as exc:
            failure = f"output_dir={output_dir}: rank 0 cannot write {marker}: {exc}"
    marker, failure = dist.broadcast_object((marker, failure))
    try:
        if failure:
            raise UserError(failure)
        missing = _not_on_every_node(lambda: _wait_for(out / marker.name, marker.name))  # this node's output_dir
    finally:
        if dist.is_rank0():
            marker.unlink(missing_ok=True)
            for d in made:  # deepest first; only if still empty
                try:
                    d.rmdir()
                except OSError:
                    break
    if missing:
        raise UserError(
            f"output_dir={output_dir}: not shared between nodes: rank {missing[0]} (on another node than rank 0) "
            f"does not see the file rank 0 wrote into it ({marker}); every node must reach output_dir at the same "
            "path on a shared file system (all ranks write each checkpoint into it)"
        )


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


def base_param_groups(engine: Any) -> list[dict[str, Any]]:
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
