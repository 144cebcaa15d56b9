"""Rank-0 metrics: TensorBoard scalars plus the same numbers as JSON lines (``metrics.jsonl``)."""

from __future__ import annotations

import json
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from ctcd_ds import dist
from ctcd_ds.layout import METRICS_FILE


def kept_lines(path: Path, last_step: int) -> list[str]:
    """The lines of a metrics file up to ``last_step``; a line a crash tore (not valid JSON) is dropped."""
    kept = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            print(f"warning: {path}:{n}: dropped a torn line (not a metrics record)", flush=True)
            continue
        if step <= last_step:
            kept.append(line)
    return kept


class Monitor:
    """Writes ``{tag: value}`` at a step to ``<run>/tensorboard`` and ``<run>/metrics.jsonl`` (rank 0 only)."""

    def __init__(self, output_dir: Path, start_step: int):
        self.tb_dir = Path(output_dir) / "tensorboard"
        self.writer = None
        self.jsonl = None
        if dist.is_rank0():
            # purge_step drops events a crashed run wrote after its last checkpoint
            self.writer = SummaryWriter(str(self.tb_dir), purge_step=start_step or None)
            path = Path(output_dir) / METRICS_FILE
            if path.exists():  # likewise drop lines past the checkpoint we resume from
                path.write_text("".join(line + "\n" for line in kept_lines(path, start_step)))
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
