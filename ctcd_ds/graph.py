"""The distillation graph: named members and the edges between them.

Every schedule (CTCD, one-way KD, standalone, DWT, Community KD, HomoDistil, MiniDisc) is data of this
shape; the training loop only walks it: each member's loss is its MLM loss plus, for each incoming edge,
the weighted KD loss (and the weighted hidden-state MSE where the edge asks for it).
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field, replace

from ctcd_ds.config import EdgeConfig, FinetuneConfig, PretrainConfig, PretrainMemberConfig
from ctcd_ds.config.sections import WeightSchedule

SCHEDULES = typing.get_args(WeightSchedule)


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
    """A member, or a view of one (``student@0.5``: a sandwich sub-network of ``student``)."""
    temperature: float
    weight0: float
    schedule: str = "constant"
    weight1: float = 1.0
    schedule_steps: int = 0
    hidden_weight: float = 0.0
    share: float = 1.0
    """Multiplier of both weights: 1 / (number of views) for the edges into a sandwich-trained member."""

    @property
    def name(self) -> str:
        return f"{self.source}->{self.target}"

    @property
    def owner(self) -> str:
        """The member whose loss this edge joins (the target, or the member a view belongs to)."""
        return self.target.split(VIEW_SEP)[0]

    def weight(self, step: int) -> float:
        """The edge's KD weight at optimizer step ``step`` (0-based)."""
        return self.share * scheduled_weight(self.schedule, self.weight0, self.weight1, self.schedule_steps, step)

    @property
    def hidden(self) -> float:
        """The edge's hidden-state MSE weight."""
        return self.share * self.hidden_weight

    @classmethod
    def from_config(cls, cfg: EdgeConfig, total_steps: int) -> Edge:
        """The edge of a run of ``total_steps`` optimizer steps (its schedule ends at a fraction of them)."""
        return cls(
            source=cfg.source,
            target=cfg.target,
            temperature=cfg.temperature,
            weight0=cfg.weight,
            schedule=cfg.schedule,
            weight1=cfg.final_weight,
            schedule_steps=round(cfg.schedule_end * total_steps),
            hidden_weight=cfg.hidden_weight,
        )


VIEW_SEP = "@"


def view_name(member: str, sparsity: float) -> str:
    return f"{member}{VIEW_SEP}{sparsity:g}"


@dataclass(frozen=True, slots=True)
class Graph:
    members: tuple[str, ...]
    trainable: frozenset[str]
    edges: tuple[Edge, ...]
    views: dict[str, tuple[float, ...]] = field(default_factory=dict)
    """Sandwich sub-networks (width sparsities) each member also runs as; absent = none."""

    def incoming(self, member: str) -> tuple[Edge, ...]:
        """Every edge whose loss joins ``member``'s (its views' included)."""
        return tuple(e for e in self.edges if e.owner == member)

    @classmethod
    def from_config(cls, cfg: PretrainConfig | FinetuneConfig) -> Graph:
        """The run's graph; an edge into a sandwich-trained member is repeated for each of its views, every
        copy weighted 1 / (views + 1), so the member's KD loss is the average over its full model and views."""
        views = {
            n: tuple(m.minidisc.sandwich)
            for n, m in cfg.members.items()
            if isinstance(m, PretrainMemberConfig) and m.minidisc.sandwich
        }
        edges: list[Edge] = []
        for e in (Edge.from_config(c, cfg.train.steps) for c in cfg.edges):
            targets = [e.target, *(view_name(e.target, s) for s in views.get(e.target, ()))]
            edges += [replace(e, target=t, share=1.0 / len(targets)) for t in targets]
        return cls(
            members=tuple(cfg.members),
            trainable=frozenset(n for n, m in cfg.members.items() if m.trainable),
            edges=tuple(edges),
            views=views,
        )
