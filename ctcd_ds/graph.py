"""The distillation graph: named members and the edges between them.

Every schedule (CTCD, one-way KD, standalone, ...) is data of this shape; the training loop only walks
it: each member's loss is its MLM loss plus the weighted KD loss of each incoming edge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ctcd_ds.config import EdgeConfig, RunConfig

SCHEDULES = ("constant", "linear", "cosine", "step")


def scheduled_weight(schedule: str, w0: float, w1: float, steps: int, step: int) -> float:
    """Weight at optimizer step ``step`` (0-based: the step being taken) moving from w0 to w1 over ``steps``."""
    assert schedule in SCHEDULES, schedule
    if schedule == "constant":
        return w0
    if schedule == "step":
        return w0 if step < steps else w1
    progress = min(1.0, step / steps) if steps > 0 else 1.0
    if schedule == "cosine":
        progress = 0.5 * (1.0 - math.cos(math.pi * progress))
    return w0 + (w1 - w0) * progress


@dataclass(frozen=True, slots=True)
class Edge:
    source: str
    target: str
    temperature: float
    weight0: float
    schedule: str = "constant"
    weight1: float = 1.0
    schedule_steps: int = 0

    @property
    def name(self) -> str:
        return f"{self.source}->{self.target}"

    def weight(self, step: int) -> float:
        """The edge's weight at optimizer step ``step`` (0-based)."""
        return scheduled_weight(self.schedule, self.weight0, self.weight1, self.schedule_steps, step)

    @classmethod
    def from_config(cls, cfg: EdgeConfig) -> "Edge":
        return cls(
            source=cfg.source,
            target=cfg.target,
            temperature=cfg.temperature,
            weight0=cfg.weight,
            schedule=cfg.schedule,
            weight1=cfg.final_weight,
            schedule_steps=cfg.schedule_steps,
        )


@dataclass(frozen=True, slots=True)
class Graph:
    members: tuple[str, ...]
    trainable: frozenset[str]
    edges: tuple[Edge, ...]

    def incoming(self, member: str) -> tuple[Edge, ...]:
        return tuple(e for e in self.edges if e.target == member)

    @classmethod
    def from_config(cls, cfg: RunConfig) -> "Graph":
        return cls(
            members=tuple(cfg.members),
            trainable=frozenset(n for n, m in cfg.members.items() if m.trainable),
            edges=tuple(Edge.from_config(e) for e in cfg.edges),
        )
