"""Prepared data: a corpus tokenized and grouped into blocks once (``ctcd-ds prepare-data``), then read by
every run and every node (``data.prepared=DIR``) instead of tokenizing again. See docs/data.md.

A prepared directory::

    DIR/
      train/  eval/   the blocks of each split (`datasets` ``save_to_disk``; runs load them memory-mapped)
      tokenizer/      the tokenizer they were made with (a run without a tokenizer of its own uses it)
      manifest.json   seq_len, tokenizer fingerprint and size, the sources, block counts, bytes per token;
                      written last: a directory without it is not prepared data

It is written into a hidden sibling ``.DIR.partial-HOST-PID`` and renamed into place only when complete, so
an interrupted preparation never leaves a directory that looks prepared.

This module reads and checks prepared directories and imports neither `datasets` nor DeepSpeed (``checks``
uses it); writing one is :mod:`ctcd_ds.prepare`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from ctcd_ds.config import DataConfig, PretrainConfig
from ctcd_ds.errors import UserError
from ctcd_ds.presets import weight_dirs
from ctcd_ds.tokenizer import has_tokenizer, load_tokenizer, pretrained_tokenizer_source

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer"
SPLITS = ("train", "eval")
FORMAT = "ctcd-ds prepared data"
VERSION = 1
SETTINGS = ("version", "seq_len", "token_dtype", "tokenizer_fingerprint", "sources")
"""The manifest entries that make two preparations the same: preparing again with equal ones does nothing."""
PREPARE_WRITES = "data.prepared={}: prepare-data writes prepared data (to --out); leave data.prepared empty"


def tokenizer_fingerprint(tok: PreTrainedTokenizerBase) -> str:
    """A short SHA-256 of everything that decides a tokenizer's ids: its full definition (normalizer,
    pre-tokenizer, model with vocabulary and scores, post-processor; not the runtime padding/truncation) and
    its special-token ids. Equal for a tokenizer and its saved copy."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        definition.pop("truncation", None)
        definition.pop("padding", None)
    else:  # a slow tokenizer: its vocabulary
        definition = sorted(tok.get_vocab().items())
    special = {name: getattr(tok, f"{name}_token_id", None) for name in ("pad", "unk", "cls", "sep", "mask")}
    blob = json.dumps({"definition": definition, "special": special, "size": len(tok)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def manifest_of(directory: str | Path) -> dict[str, Any] | str:
    """The manifest of a finished prepared directory, or why ``directory`` is not one."""
    root = Path(directory)
    if not root.is_dir():
        return "no such directory"
    path = root / MANIFEST
    if not path.is_file():
        return (
            "not a prepared data directory (no manifest.json; `ctcd-ds prepare-data --out DIR` makes one, and an "
            "interrupted preparation leaves none)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return f"cannot read its manifest.json ({exc})"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return "its manifest.json is not a ctcd-ds prepared data manifest"
    if manifest.get("version") != VERSION:
        return f"written in version {manifest.get('version')} of the format, this is {VERSION}; prepare it again"
    missing = [p for p in SPLITS if not (root / p / "state.json").is_file()]
    missing += [TOKENIZER] if not has_tokenizer(root / TOKENIZER) else []
    if missing:
        return f"incomplete: {', '.join(missing)} missing"
    return manifest


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of ``data.prepared``; a UserError naming the setting if it is not a prepared directory."""
    manifest = manifest_of(directory)
    if isinstance(manifest, str):
        raise UserError(f"data.prepared={directory}: {manifest}")
    return manifest


def _source_problems(data: DataConfig, manifest: dict[str, Any], flag: str) -> list[str]:
    """Corpus settings of the run that say something else than what the prepared blocks were made from."""
    made = manifest["sources"]
    problems = []
    for key in ("train_files", "eval_files"):
        given = [os.path.abspath(f) for f in getattr(data, key)]
        theirs = [f["path"] for f in made.get(key, [])]
        if given and given != theirs:
            problems.append(
                f"data.{key}={getattr(data, key)}: {flag} was made from {theirs or made.get('dataset')}; a run with "
                f"data.prepared reads its blocks, not text: drop data.{key}, or prepare the data again from them"
            )
    if data.dataset and (data.dataset, data.dataset_config) != (made.get("dataset"), made.get("config")):
        problems.append(
            f"data.dataset={data.dataset}: {flag} was made from "
            f"{made.get('dataset') or [f['path'] for f in made.get('train_files', [])]}; drop data.dataset, or "
            "prepare the data again from it"
        )
    return problems


def compatibility_problems(data: DataConfig, tokenizer: PreTrainedTokenizerBase | None, who: str) -> list[str]:
    """Why the blocks of ``data.prepared`` cannot feed this run: not a finished prepared directory, another
    ``seq_len``, a run tokenizer (``tokenizer``, described by ``who``; None: nothing to compare) other than the
    one they were made with, or corpus settings naming other text. Both values are named."""
    flag = f"data.prepared={data.prepared}"
    manifest = manifest_of(data.prepared)
    if isinstance(manifest, str):
        return [f"{flag}: {manifest}"]
    problems = []
    if data.seq_len != manifest["seq_len"]:
        problems.append(
            f"data.seq_len={data.seq_len}: {flag} holds {manifest['seq_len']}-token blocks; set "
            f"data.seq_len={manifest['seq_len']}, or prepare the data again with data.seq_len={data.seq_len}"
        )
    problems.extend(_source_problems(data, manifest, flag))
    if tokenizer is not None:
        theirs_dir = Path(data.prepared) / TOKENIZER
        try:
            theirs = load_tokenizer(theirs_dir)
        except (OSError, ValueError) as exc:
            return [*problems, f"{flag}: cannot load its tokenizer ({exc})"]
        ours_fp, theirs_fp = tokenizer_fingerprint(tokenizer), tokenizer_fingerprint(theirs)
        if ours_fp != theirs_fp:
            problems.append(
                f"{who}: the run's tokenizer ({len(tokenizer)} tokens, fingerprint {ours_fp}) is not the one {flag} "
                f"was made with ({theirs_dir}: {len(theirs)} tokens, fingerprint {theirs_fp}); leave tokenizer.path "
                "empty to use the prepared one, or prepare the data again with this tokenizer"
            )
    return problems


def run_problems(cfg: PretrainConfig) -> list[str]:
    """The problems of ``data.prepared`` in a pre-training config, before anything is written: the run's
    tokenizer (``tokenizer.path``, or a pretrained member's) is compared with the prepared one."""
    if not cfg.data.prepared:
        return []
    dirs = weight_dirs(cfg.members)
    source = pretrained_tokenizer_source(cfg.tokenizer.path, list(dirs.values()))
    tokenizer, who = None, ""
    if source and has_tokenizer(source):
        try:
            tokenizer = load_tokenizer(source)
        except (OSError, ValueError):
            pass  # the tokenizer checks report it
        flags = [f"{flag}={d}" for flag, d in dirs.items() if d == source]
        who = f"tokenizer.path={source}" if source == cfg.tokenizer.path else flags[0]
    return compatibility_problems(cfg.data, tokenizer, who)


def use_prepared_tokenizer(cfg: PretrainConfig) -> PretrainConfig:
    """A run with ``data.prepared`` and no tokenizer of its own (``tokenizer.path`` empty, no pretrained member
    carrying one) uses the tokenizer saved in the prepared directory: ``tokenizer.path`` is set to it, so the
    checks, the run and its saved config all name it (nothing is trained, no text is read)."""
    own = pretrained_tokenizer_source(cfg.tokenizer.path, list(weight_dirs(cfg.members).values()))
    if cfg.data.prepared and own is None:
        prepared_tokenizer = Path(cfg.data.prepared) / TOKENIZER
        if has_tokenizer(prepared_tokenizer):
            cfg.tokenizer.path = str(prepared_tokenizer)
    return cfg


# --------------------------------------------------------------------------------------------------
# writing (ctcd-ds prepare-data)


def out_problems(out: str) -> list[str]:
    """Problems of ``prepare-data --out`` that need no tokenizer: it must be new, empty, or prepared data
    (any other non-empty directory is never overwritten)."""
    if not out:
        return ["--out: give the directory to write the prepared data to"]
    root = Path(out)
    if root.exists() and not root.is_dir():
        return [f"--out={out}: exists and is not a directory"]
    if root.is_dir() and any(root.iterdir()):
        manifest = manifest_of(root)
        if isinstance(manifest, str):
            return [f"--out={out}: not empty, and {manifest}; nothing is overwritten: give a new or empty directory"]
    return []
