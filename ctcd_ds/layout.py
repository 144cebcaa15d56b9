"""Where a run's files go, and how to recognise a finished checkpoint (no I/O beyond reading paths).

<output_dir>/
    config.yaml  metrics.jsonl  summary.json  tensorboard/  tokenizer/  export/NAME/  results.json (fine-tuning)
    checkpoints/step_00000100/  NAME/ (DeepSpeed, tag = member)  rng_rankR.pt  trainer_state.json  config.yaml
                                manifest.json (size and sha256 of every other file; none before manifests)
    checkpoints/latest          the name of the newest complete checkpoint, written last
    checkpoints/.step_N.tmp     a checkpoint being written (renamed to step_N when complete)
    checkpoints/.step_N.old     an older step_N being replaced (removed once the new one is in place)
"""

from __future__ import annotations

from pathlib import Path

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
"""What the run measured at its end (throughput, memory per rank, members' sizes and FLOPs), written by rank 0."""
STATE_FILE = "trainer_state.json"
LATEST = "latest"
MANIFEST_FILE = "manifest.json"
STEP_PREFIX = "step_"


def checkpoints_dir(output_dir: Path | str) -> Path:
    return Path(output_dir) / "checkpoints"


def tag(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def step_of(name: Path | str) -> int | None:
    """``step_00000100`` (or a path ending in it) -> 100; None for any other name."""
    base = Path(name).name
    digits = base[len(STEP_PREFIX) :]
    return int(digits) if base.startswith(STEP_PREFIX) and digits.isascii() and digits.isdigit() else None


def is_checkpoint(path: Path | str) -> bool:
    return (Path(path) / STATE_FILE).is_file()


def checkpoints(output_dir: Path | str) -> list[Path]:
    """Every complete checkpoint of a run directory (a ``step_N`` folder with its trainer state), oldest first."""
    root = checkpoints_dir(output_dir)
    found = [p for p in root.glob(f"{STEP_PREFIX}*") if step_of(p) is not None and is_checkpoint(p)]
    return sorted(found, key=step_of)


def latest(output_dir: Path | str) -> Path | None:
    """The complete checkpoint ``checkpoints/latest`` names, or None (no pointer, or it names a missing or
    incomplete folder). Nothing is verified: to resume, use :func:`ctcd_ds.checkpoint.resume_point`."""
    pointer = checkpoints_dir(output_dir) / LATEST
    if not pointer.is_file():
        return None
    path = checkpoints_dir(output_dir) / pointer.read_text().strip()
    return path if is_checkpoint(path) else None


def run_dir_of(checkpoint: Path | str) -> Path:
    """``<run>/checkpoints/step_N`` -> ``<run>``."""
    return Path(checkpoint).parent.parent


def is_checkpoint_member(path: Path | str) -> bool:
    """``runs/x/checkpoints/step_N/NAME``: a member's folder inside a joint checkpoint."""
    return is_checkpoint(Path(path).parent)
