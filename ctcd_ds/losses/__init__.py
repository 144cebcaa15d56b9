"""Distillation losses behind one interface: :func:`edge_losses`.

``fused`` (default): the two directions of a co-distilling pair (``a -> b`` and ``b -> a`` at the same
temperature) come from one pass of :func:`ctcd_ds.losses.fused.bidirectional_kl`, which computes both
softmaxes, both values and both closed-form gradients together (Triton on CUDA, chunked torch
elsewhere); a one-way edge is the same call with the other direction's weight at 0.
``reference``: plain torch, one ``F.kl_div`` per edge (``reference.kd_loss``), for debugging.
Both give the same values and gradients (tests/test_fused_kd.py, tests/test_train.py).
:func:`hidden_mse` is the hidden-state loss of edges with a ``hidden_weight`` (HomoDistil).
"""

from __future__ import annotations

import torch

from ctcd_ds.graph import Edge
from ctcd_ds.losses.fused import bidirectional_kl
from ctcd_ds.losses.reference import hidden_mse, kd_loss

IMPLEMENTATIONS = ("fused", "reference")
__all__ = ["IMPLEMENTATIONS", "edge_losses", "hidden_mse"]


def edge_losses(logits: dict[str, torch.Tensor], edges: tuple[Edge, ...], impl: str) -> dict[Edge, torch.Tensor]:
    """Unweighted ``tau^2 * KL(p_source || p_target)`` for every edge; each graph reaches only its target."""
    assert impl in IMPLEMENTATIONS, impl
    if impl == "reference":
        return {e: kd_loss(logits[e.source], logits[e.target], e.temperature) for e in edges}
    by_ends = {(e.source, e.target): e for e in edges}
    out: dict[Edge, torch.Tensor] = {}
    for e in edges:
        if e in out:
            continue
        back = by_ends.get((e.target, e.source))
        if back is not None and back.temperature != e.temperature:
            back = None  # different temperatures: two separate passes
        pair = bidirectional_kl(logits[e.source], logits[e.target], e.temperature, weight_ab=1.0, weight_ba=1.0 if back else 0.0)
        out[e] = pair.loss_ab
        if back is not None:
            out[back] = pair.loss_ba
    return out
