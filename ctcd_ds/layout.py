"""Where a run's files go, and how to recognise a finished checkpoint (no I/O beyond reading paths).

<output_dir>/
    config.yaml  metrics.jsonl  tensorboard/  tokenizer/  export/NAME/  results.json (fine-tuning)
    checkpoints/step_00000100/  NAME/ (DeepSpeed, tag = member)  rng_rankR.pt  trainer_state.json  config.yaml
    checkpoints/latest          the name of the newest complete checkpoint, written last
"""

from __future__ import annotations

from pathlib import Path

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "trainer_state.json"
LATEST = "latest"


def checkpoints_dir(output_dir: Path | str) -> Path:
    return Path(output_dir) / "checkpoints"


def tag(step: int) -> str:
    return f"step_{step:08d}"


def is_checkpoint(path: Path | str) -> bool:
    return (Path(path) / STATE_FILE).is_file()


def latest(output_dir: Path | str) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    pointer = checkpoints_dir(output_dir) / LATEST
    if not pointer.is_file():
        return None
    path = checkpoints_dir(output_dir) / pointer.read_text().strip()
    return path if is_checkpoint(path) else None


def run_dir_of(checkpoint: Path | str) -> Path:
    """``<run>/checkpoints/step_N`` -> ``<run>``."""
    return Path(checkpoint).parent.parent
