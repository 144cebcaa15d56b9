"""Files shipped inside the package: the bundled corpus and task, and the ZeRO templates."""

from __future__ import annotations

from pathlib import Path

from ctcd_ds.config import PACKAGE_DIR, DataConfig

BUNDLED_CORPUS = PACKAGE_DIR / "assets" / "wikitext-2"
BUNDLED_TRAIN = [str(BUNDLED_CORPUS / "test.txt")]
"""WikiText-2 raw test split: the bundled training text (the valid split is held out)."""
BUNDLED_EVAL = [str(BUNDLED_CORPUS / "valid.txt")]
BUNDLED_SST2 = PACKAGE_DIR / "assets" / "sst2"


def templates_dir() -> Path:
    """The ZeRO templates: ``ds_configs/`` of the checkout, shipped in a wheel as ``ctcd_ds/ds_templates/``."""
    installed = PACKAGE_DIR / "ds_templates"
    return installed if installed.is_dir() else PACKAGE_DIR.parent / "ds_configs"


def corpus_files(cfg: DataConfig) -> tuple[list[str], list[str]]:
    """(train files, eval files) after applying the bundled-corpus default."""
    if cfg.dataset:
        return [], []
    if not cfg.train_files:
        return BUNDLED_TRAIN, list(cfg.eval_files) or BUNDLED_EVAL
    return list(cfg.train_files), list(cfg.eval_files)
