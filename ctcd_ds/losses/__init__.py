"""Distillation losses (torch only; Triton is optional, used on CUDA when installed).

- :mod:`~ctcd_ds.losses.reference`: the readable definition in plain torch, :func:`kd_loss`
  (``tau^2 * KL(p_source || p_target)``, gradient into the target only), :func:`bidirectional_kd_loss` (both
  directions of a pair as two independent graphs) and :func:`hidden_mse` (the hidden-state loss).
- :mod:`~ctcd_ds.losses.fused`: :func:`bidirectional_kl`, both directions of a pair (same temperature) in one
  pass that computes both softmaxes, both values and both closed-form gradients (Triton on CUDA, chunked
  torch elsewhere); a one-way edge is the same call with the other direction's weight at 0.
- :mod:`~ctcd_ds.losses.fused_linear`: :func:`fused_linear_bidirectional_kl`, the same with the LM-head
  matmul and both MLM cross-entropies folded in, never materialising the ``N x V`` logits.

The fused losses give the reference's values and gradients (tests/test_fused_kd.py).
"""

from __future__ import annotations

from ctcd_ds.losses.fused import BidirectionalKL, bidirectional_kl
from ctcd_ds.losses.fused_linear import LinearBidirectionalKL, fused_linear_bidirectional_kl
from ctcd_ds.losses.reference import bidirectional_kd_loss, hidden_mse, kd_loss

__all__ = [
    "BidirectionalKL",
    "LinearBidirectionalKL",
    "bidirectional_kd_loss",
    "bidirectional_kl",
    "fused_linear_bidirectional_kl",
    "hidden_mse",
    "kd_loss",
]
