"""Checkpoint files on disk: synced writes, the manifest (size and sha256 of every file) and its verification,
and telling a full disk from other write failures. Knows nothing of engines or ranks."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ctcd_ds.layout import MANIFEST_FILE

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
CHUNK = 8 << 20  # bytes read at a time when hashing
PROBE_BYTES = 1 << 20  # written to tell a full disk behind torch's zip writer errors
HASH_THREADS = 8  # files hashed at once (hashlib lets go of the GIL): a checkpoint holds a file per rank and member


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def replace_synced(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all: a synced temporary file renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write_synced(tmp, text)
    os.replace(tmp, path)


def sha256_file(path: Path, fsync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
        if fsync:  # on the way: the pages of a file another rank wrote reach the disk too
            os.fsync(f.fileno())
    return digest.hexdigest()


def _sha256_all(paths: list[Path], fsync: bool = False) -> list[str]:
    with ThreadPoolExecutor(max_workers=max(1, min(HASH_THREADS, len(paths), os.cpu_count() or 1))) as pool:
        return list(pool.map(lambda path: sha256_file(path, fsync), paths))


def write_manifest(folder: Path) -> None:
    """Size and sha256 of every file under ``folder`` into its ``manifest.json``; every file and folder is
    fsynced (rank 0, once every rank's files exist)."""
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p != folder / MANIFEST_FILE)
    files = {
        path.relative_to(folder).as_posix(): {"size": path.stat().st_size, "sha256": digest}
        for path, digest in zip(paths, _sha256_all(paths, fsync=True))
    }
    write_synced(folder / MANIFEST_FILE, json.dumps({"version": 1, "files": files}, indent=1))
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        fsync_dir(sub)
    fsync_dir(folder)


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
