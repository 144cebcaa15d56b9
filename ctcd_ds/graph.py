"""The distillation graph: named members and the edges between them.

Every schedule (CTCD, one-way KD, standalone, ...) is data of this shape; the training loop only walks
it: each member's loss is its MLM loss plus the weighted KD loss of each incoming edge.
"""

from __future__ import annotations

from dataclasses import dataclass

from ctcd_ds.config import EdgeConfig, RunConfig


@dataclass(frozen=True, slots=True)
class Edge:
    source: str
    target: str
    temperature: float
    weight0: float

    @property
    def name(self) -> str:
        return f"{self.source}->{self.target}"

    def weight(self, step: int) -> float:
        """The edge's weight at optimizer step ``step`` (constant for now)."""
        return self.weight0

    @classmethod
    def from_config(cls, cfg: EdgeConfig) -> "Edge":
        return cls(source=cfg.source, target=cfg.target, temperature=cfg.temperature, weight0=cfg.weight)


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
