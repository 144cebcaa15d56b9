"""Distillation losses behind one interface: :func:`edge_losses`.

``reference`` is plain torch (``reference.kd_loss``: one ``F.kl_div`` per edge). Faster
implementations plug in here and must give the same values and gradients.
"""

from __future__ import annotations

import torch

from ctcd_ds.graph import Edge
from ctcd_ds.losses.reference import kd_loss

IMPLEMENTATIONS = ("reference",)


def edge_losses(logits: dict[str, torch.Tensor], edges: tuple[Edge, ...], impl: str) -> dict[Edge, torch.Tensor]:
    """Unweighted ``tau^2 * KL(p_source || p_target)`` for every edge; each graph reaches only its target."""
    assert impl in IMPLEMENTATIONS, impl
    return {e: kd_loss(logits[e.source], logits[e.target], e.temperature) for e in edges}
