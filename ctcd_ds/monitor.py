"""Rank-0 metrics: TensorBoard scalars plus the same numbers as JSON lines (``metrics.jsonl``), and the
DeepSpeed monitors a template enables (``csv_monitor``, ``wandb``, ``comet``), fed with every member's scalars.

The engines themselves write no monitor (``ds_config.engine_config`` drops the blocks): each would log only
its own learning rate, every engine into the same job. A run restarted at step S (its checkpoint) keeps what
was logged up to S and drops what a crashed attempt logged after it; a run started afresh (no checkpoint)
drops everything an earlier attempt logged, so no curve ever doubles back.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from deepspeed.monitor.config import get_monitor_config
from deepspeed.monitor.monitor import MonitorMaster
from torch.utils.tensorboard import SummaryWriter

from ctcd_ds import dist
from ctcd_ds.layout import METRICS_FILE

EVENT_FILE_PREFIX = "events.out.tfevents."


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


def _open_tensorboard(tb_dir: Path, start_step: int) -> SummaryWriter:
    """A writer that continues after ``start_step``. Resuming: ``purge_step`` is the first step *after* the
    checkpoint, so TensorBoard hides what a crashed attempt wrote past it and keeps the checkpoint step's own
    scalars (its evaluation included). Starting afresh: an earlier attempt's event files are removed."""
    if start_step == 0 and tb_dir.is_dir():
        stale = sorted(tb_dir.glob(EVENT_FILE_PREFIX + "*"))
        for path in stale:
            path.unlink()
        if stale:
            print(f"removed {len(stale)} TensorBoard event file(s) of an earlier attempt that saved no checkpoint")
    return SummaryWriter(str(tb_dir), purge_step=start_step + 1 if start_step else None)


class CsvMonitor:
    """DeepSpeed's ``csv_monitor`` layout, one job per member: ``<output_path>/<job_name>_<member>/<tag>.csv``
    with ``step,<name>`` rows; scalars of no single member (``perf/``, ``edge/``) go to ``<job_name>/``.
    ``output_path`` empty: ``<run>/csv_monitor``."""

    def __init__(self, block: dict[str, Any], run_dir: Path, members: list[str], start_step: int):
        self.root = Path(block.get("output_path") or Path(run_dir) / "csv_monitor")
        self.job = block.get("job_name") or "DeepSpeedJobName"
        self.members = set(members)
        for job in [self.job, *(f"{self.job}_{m}" for m in members)]:
            for path in (self.root / job).glob("*.csv"):
                self._truncate(path, start_step)

    @staticmethod
    def _truncate(path: Path, last_step: int) -> None:
        rows = list(csv.reader(path.read_text().splitlines()))
        kept = rows[:1] + [r for r in rows[1:] if len(r) == 2 and r[0].isdigit() and int(r[0]) <= last_step]
        if len(kept) > 1:
            with open(path, "w", newline="") as f:
                csv.writer(f).writerows(kept)
        else:
            path.unlink()

    def path(self, tag: str) -> Path:
        """Where scalar ``tag`` goes: the job of the member it names, its name the tag without the member."""
        parts = tag.split("/")
        for i, part in enumerate(parts):
            if part in self.members:
                return self.root / f"{self.job}_{part}" / ("_".join(parts[:i] + parts[i + 1 :]) + ".csv")
        return self.root / self.job / (tag.replace("/", "_").replace(" ", "_") + ".csv")

    def write(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            path = self.path(tag)
            new = not path.exists()
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", newline="") as f:
                writer = csv.writer(f)
                if new:
                    writer.writerow(["step", path.stem])
                writer.writerow([step, value])


class Monitor:
    """Writes ``{tag: value}`` at a step to ``<run>/tensorboard``, ``<run>/metrics.jsonl`` and the template's
    monitors (rank 0 only). ``monitors``: the enabled DeepSpeed monitor blocks (``ds_config.enabled_monitors``)."""

    def __init__(
        self, output_dir: Path, start_step: int, members: list[str] = (), monitors: dict[str, dict] | None = None
    ):
        monitors = monitors or {}
        self.tb_dir = Path(output_dir) / "tensorboard"
        self.writer = None
        self.jsonl = None
        self.csv = None
        self.hosted = None
        if dist.is_rank0():
            self.writer = _open_tensorboard(self.tb_dir, start_step)
            path = Path(output_dir) / METRICS_FILE
            if path.exists():  # likewise drop lines past the checkpoint we resume from (all of them afresh)
                path.write_text("".join(line + "\n" for line in kept_lines(path, start_step)))
            self.jsonl = open(path, "a", encoding="utf-8")
            if "csv_monitor" in monitors:
                self.csv = CsvMonitor(monitors["csv_monitor"], output_dir, list(members), start_step)
        hosted = {k: v for k, v in monitors.items() if k in ("wandb", "comet")}
        if hosted:  # one hosted run for the co-training run, every member's scalars under its own prefix
            self.hosted = MonitorMaster(get_monitor_config(hosted))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if self.writer is None:
            return
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()
        if self.csv is not None:
            self.csv.write(step, scalars)
        if self.hosted is not None:
            self.hosted.write_events([(tag, value, step) for tag, value in scalars.items()])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.jsonl.close()
