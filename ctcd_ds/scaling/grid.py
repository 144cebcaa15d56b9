"""The points of a scaling sweep: every combination of a :class:`~ctcd_ds.config.ScaleConfig`'s lists, each named
and turned into the launcher command a user would type."""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ctcd_ds.config import ScaleConfig

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "launchers" / "pretrain.sh"


@dataclass(frozen=True, slots=True)
class Point:
    recipe: str
    members: str
    """`name=preset,...` or "" for the recipe's own members."""
    nodes: int
    ranks_per_node: int
    template: str
    micro_batch: int
    grad_accum: int
    precision: str
    seq_len: int | None
    """None: the recipe's data.seq_len."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def name(self) -> str:
        """A folder name that says what the point is (and a short hash of what does not fit in it)."""
        parts = [
            _short(self.recipe),
            f"n{self.nodes}x{self.ranks_per_node}",
            _short(self.template),
            f"mb{self.micro_batch}",
            f"ga{self.grad_accum}",
            self.precision,
        ]
        if self.seq_len:
            parts.append(f"seq{self.seq_len}")
        if self.members:
            parts.append("m" + hashlib.sha256(self.members.encode()).hexdigest()[:6])
        return "-".join(parts)

    def as_dict(self) -> dict:
        return asdict(self) | {"world_size": self.world_size, "name": self.name}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", text)


def _short(name_or_path: str) -> str:
    """A recipe or template name as is; a file as its stem and a hash of its path (two files may share a stem)."""
    if "/" not in name_or_path and not name_or_path.endswith((".json", ".yaml", ".yml")):
        return _slug(name_or_path)
    return f"{_slug(Path(name_or_path).stem)}_{hashlib.sha256(name_or_path.encode()).hexdigest()[:6]}"


def points(cfg: ScaleConfig) -> list[Point]:
    """Every combination, in the order the lists give (nodes and ranks vary fastest: one line of the plot after
    another)."""
    grid = itertools.product(
        cfg.recipes,
        [",".join(f"{k}={v}" for k, v in m.items()) for m in cfg.members] or [""],
        cfg.templates,
        cfg.precision,
        cfg.seq_len or [None],
        cfg.micro_batch,
        cfg.grad_accum,
        cfg.nodes,
        cfg.ranks,
    )
    return [
        Point(recipe, members, nodes, ranks, template, mb, ga, precision, seq)
        for recipe, members, template, precision, seq, mb, ga, nodes, ranks in grid
    ]


def member_overrides(members: str) -> list[str]:
    """`teacher=paper-teacher,student=paper-student` -> `--members.teacher.model=paper-teacher ...`."""
    out = []
    for item in filter(None, (p.strip() for p in members.split(","))):
        name, _, preset = item.partition("=")
        out.append(f"--members.{name.strip()}.model={preset.strip()}")
    return out


def command(cfg: ScaleConfig, point: Point, run_dir: Path) -> list[str]:
    """The `bash launchers/pretrain.sh ...` of one point: a short run that logs every step, saves no checkpoint
    (a signal still does) and exports nothing."""
    cmd = ["bash", str(LAUNCHER), f"NUM_GPUS={point.ranks_per_node}", f"CONFIG={point.recipe}"]
    if point.nodes > 1:  # a 1-node point runs here, whatever the hostfile lists
        cmd += [f"HOSTFILE={cfg.hostfile}", f"NUM_NODES={point.nodes}"]
    cmd += [
        f"--output_dir={run_dir}",
        f"--deepspeed.template={point.template}",
        f"--train.micro_batch_size={point.micro_batch}",
        f"--train.grad_accum_steps={point.grad_accum}",
        f"--train.precision={point.precision}",
        f"--train.steps={cfg.steps}",
        "--train.log_every=1",
        "--train.eval_every=0",
        "--train.eval_batches=1",
        "--checkpoint.every=0",
        "--checkpoint.at_end=false",
        "--checkpoint.resume=never",
        "--export=false",
    ]
    if cfg.peak_tflops:
        cmd.append(f"--train.peak_tflops={cfg.peak_tflops}")
    if point.seq_len:
        cmd.append(f"--data.seq_len={point.seq_len}")
    return cmd + member_overrides(point.members) + list(cfg.overrides)


LAUNCHER_ENV = (
    "HOSTFILE",
    "NUM_NODES",
    "NODE_RANK",
    "LAUNCHER",
    "MASTER_ADDR",
    "MASTER_PORT",
    "CTCD_CONFIG",
    "DRY_RUN",
)
"""Launcher settings a point must not inherit from the sweep's environment: its command sets what it needs."""


def environment(cfg: ScaleConfig, base: dict[str, str]) -> dict[str, str]:
    """The environment of a point: the sweep's, without launcher settings, with the point's CPU threads."""
    env = {k: v for k, v in base.items() if k not in LAUNCHER_ENV and k != "OMP_NUM_THREADS"}
    if cfg.cpu_threads_per_rank:
        env["OMP_NUM_THREADS"] = str(cfg.cpu_threads_per_rank)
    return env


def settings_key(cfg: ScaleConfig, point: Point) -> dict:
    """Everything that decides a point's figures: its launcher command (without the run directory), the timed steps
    and the CPU threads. A finished point is reused only while this is unchanged."""
    cmd = [a for a in command(cfg, point, Path("RUN")) if a != "--output_dir=RUN"]
    return {"command": cmd[2:], "warmup_steps": cfg.warmup_steps, "cpu_threads_per_rank": cfg.cpu_threads_per_rank}
