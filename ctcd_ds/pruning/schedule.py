"""The cubic sparsity schedule of gradual pruning (Zhu & Gupta 2017)."""

from __future__ import annotations


def cubic_kept(full: int, target: int, progress: float) -> int:
    """Units kept at ``progress`` in [0, 1] of a cubic schedule from ``full`` to ``target`` (Zhu & Gupta 2017):
    the pruned share grows as ``1 - (1 - progress)^3``, fast at first and settling at the target."""
    progress = min(1.0, max(0.0, progress))
    return target + round((full - target) * (1.0 - progress) ** 3)
