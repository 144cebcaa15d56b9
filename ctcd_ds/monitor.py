"""Rank-0 metrics: TensorBoard scalars plus the same numbers as JSON lines (``metrics.jsonl``)."""

from __future__ import annotations

import json
from pathlib import Path

from ctcd_ds import dist


class Monitor:
    """Writes ``{tag: value}`` at a step to ``<run>/tensorboard`` and ``<run>/metrics.jsonl`` (rank 0 only)."""

    def __init__(self, output_dir: Path, start_step: int):
        self.tb_dir = Path(output_dir) / "tensorboard"
        self.writer = None
        self.jsonl = None
        if dist.is_rank0():
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a crashed run wrote after its last checkpoint
            self.writer = SummaryWriter(str(self.tb_dir), purge_step=start_step or None)
            path = Path(output_dir) / "metrics.jsonl"
            if path.exists():  # likewise drop lines past the checkpoint we resume from
                kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= start_step]
                path.write_text("".join(line + "\n" for line in kept))
            self.jsonl = open(path, "a", encoding="utf-8")

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if self.writer is None:
            return
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.jsonl.close()
