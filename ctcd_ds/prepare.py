"""``ctcd-ds prepare-data``: tokenize and group a corpus into a prepared directory once (the format and its
checks: :mod:`ctcd_ds.prepared`). See docs/data.md."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from ctcd_ds import __version__
from ctcd_ds.assets import corpus_files
from ctcd_ds.config import PretrainConfig
from ctcd_ds.data import auto_num_proc, run_tokenizer, token_dtype, write_blocks
from ctcd_ds.errors import UserError
from ctcd_ds.integrity import fsync_dir, sha256_file
from ctcd_ds.prepared import (
    FORMAT,
    MANIFEST,
    PREPARE_WRITES,
    SPLITS,
    TOKENIZER,
    VERSION,
    manifest_of,
    out_problems,
    tokenizer_fingerprint,
)
from ctcd_ds.tokenizer import save_tokenizer


def _file_records(files: list[str]) -> list[dict[str, Any]]:
    """Path, size and SHA-256 of each source file (read in chunks: corpora may be larger than memory)."""
    return [{"path": os.path.abspath(f), "bytes": os.path.getsize(f), "sha256": sha256_file(Path(f))} for f in files]


def _settings(cfg: PretrainConfig, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    d = cfg.data
    held_out = {"eval_fraction": d.eval_fraction, "seed": cfg.seed}
    if d.dataset:  # the dataset's validation/valid/test split if it has one, else held_out
        sources = {"dataset": d.dataset, "config": d.dataset_config, "text_column": d.text_column, **held_out}
    else:
        train_files, eval_files = corpus_files(d)
        sources = {"train_files": _file_records(train_files), "eval_files": _file_records(eval_files)}
        sources |= {} if eval_files else held_out
    return {
        "version": VERSION,
        "seq_len": d.seq_len,
        "token_dtype": token_dtype(len(tokenizer)),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "sources": sources,
    }


def _changes(manifest: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    def short(value: Any) -> str:
        text = json.dumps(value)
        return text if len(text) <= 80 else text[:77] + "..."

    return [
        f"{key} {short(manifest.get(key))} there, {short(value)} now"
        for key, value in settings.items()
        if manifest.get(key) != value
    ]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_leftovers(dest: Path) -> None:
    """Remove what an interrupted preparation into ``dest`` on this host left (its process is gone)."""
    host = socket.gethostname()
    for kind in ("partial", "replaced"):
        for path in dest.parent.glob(f".{dest.name}.{kind}-{host}-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                print(f"removing {path} (left by an interrupted preparation)", flush=True)
                shutil.rmtree(path, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` to disk (before the manifest says it is complete)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _put_in_place(tmp: Path, dest: Path, out: str) -> None:
    """Rename the finished ``tmp`` to ``dest`` (replacing an empty directory, or prepared data: --overwrite)."""
    try:
        if dest.is_dir() and any(dest.iterdir()):
            old = dest.with_name(f".{dest.name}.replaced-{socket.gethostname()}-{os.getpid()}")
            os.rename(dest, old)
            os.rename(tmp, dest)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dest)
    except OSError as exc:  # e.g. another process filled dest meanwhile
        raise UserError(f"--out={out}: cannot move the prepared data into place ({exc})") from exc
    fsync_dir(dest.parent)


def prepare_data(cfg: PretrainConfig, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Tokenize and group the corpus of ``cfg`` into ``out`` once, for ``data.prepared=out`` in any run.

    The tokenizer is resolved (or trained) exactly as ``ctcd-ds pretrain`` with this config would; the blocks
    and the held-out split (``eval_fraction`` with ``cfg.seed`` when there are no eval files) are the ones the
    run would make from the text. ``out`` must be new, empty, or prepared data: prepared with the same settings
    (:data:`SETTINGS`) it is left as is (``status`` "unchanged"); with other settings it is replaced only if
    ``overwrite``. Returns ``{"status", "dir", "manifest"}``.
    """
    problems = out_problems(str(out))
    if cfg.data.prepared:
        problems.append(PREPARE_WRITES.format(cfg.data.prepared))
    if problems:
        raise UserError(problems)
    dest = Path(os.path.abspath(out))
    start = time.perf_counter()
    tokenizer = run_tokenizer(cfg)  # the run's own resolution: path, member or trained
    settings = _settings(cfg, tokenizer)
    existing = manifest_of(dest) if dest.is_dir() and any(dest.iterdir()) else None
    if isinstance(existing, dict):
        changes = _changes(existing, settings)
        if not changes:
            return {"status": "unchanged", "dir": str(dest), "manifest": existing}
        if not overwrite:
            raise UserError(
                f"--out={out}: holds data prepared with other settings ({'; '.join(changes)}); give another --out, "
                "or --overwrite to replace it"
            )
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(dest)
    tmp = dest.with_name(f".{dest.name}.partial-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        counts = write_blocks(cfg.data, tokenizer, cfg.seed, tmp)
        save_tokenizer(tokenizer, tmp / TOKENIZER)
        tokens = {split: n * cfg.data.seq_len for split, n in counts.items()}
        sizes = {split: _size(tmp / split) for split in SPLITS}
        train_files, eval_files = corpus_files(cfg.data)
        manifest = {
            "format": FORMAT,
            **settings,
            "vocab_size": len(tokenizer),
            "tokenizer_source": str(tokenizer.name_or_path),
            "blocks": counts,
            "tokens": tokens,
            "bytes": sizes,
            "bytes_per_token": round(sum(sizes.values()) / max(1, sum(tokens.values())), 4),
            "num_proc": auto_num_proc(cfg.data, train_files + eval_files),
            "seconds": round(time.perf_counter() - start, 1),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "created_by": f"ctcd-ds {__version__}",
        }
        _fsync_tree(tmp)  # the blocks are on disk before the manifest says they are complete
        with open(tmp / MANIFEST, "w") as fh:
            fh.write(json.dumps(manifest, indent=2) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(tmp)
        _put_in_place(tmp, dest, str(out))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"status": "written", "dir": str(dest), "manifest": manifest}
