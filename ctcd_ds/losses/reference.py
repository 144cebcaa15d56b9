"""Plain-torch distillation losses: the readable definition every faster path is tested against.

Notation (see README, "The loss"): for logits ``z`` at the masked rows and temperature ``tau``,
``p = softmax(z / tau)``. An edge ``source -> target`` adds to the *target's* loss

    tau**2 * KL(p_source || p_target)      (batch mean over rows, ``p_source`` detached)

so the gradient only ever flows into the target model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(source_logits: torch.Tensor, target_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``tau^2 * KL(p_source || p_target)`` averaged over rows; gradient flows into ``target_logits`` only.

    Both tensors are ``[rows, vocab]``. Zero rows give a zero loss (not NaN) that still has a grad_fn.
    Computed in float32 whatever the input dtype.
    """
    assert source_logits.shape == target_logits.shape, (source_logits.shape, target_logits.shape)
    rows = target_logits.shape[0]
    if rows == 0:
        return target_logits.float().sum() * 0.0
    log_p_source = F.log_softmax(source_logits.detach().float() / temperature, dim=-1)
    log_p_target = F.log_softmax(target_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_p_target, log_p_source, reduction="batchmean", log_target=True)
    return kl * temperature**2


def bidirectional_kd_loss(
    logits_a: torch.Tensor, logits_b: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two directions of a co-distillation pair, as two independent graphs.

    Returns ``(a_to_b, b_to_a)``: ``a_to_b`` is ``kd_loss(a, b)`` (gradient into ``logits_b``),
    ``b_to_a`` is ``kd_loss(b, a)`` (gradient into ``logits_a``).
    """
    return kd_loss(logits_a, logits_b, temperature), kd_loss(logits_b, logits_a, temperature)


def hidden_mse(
    source_hidden: torch.Tensor,
    target_hidden: torch.Tensor,
    source_keep: torch.Tensor | None = None,
    target_keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error between two members' hidden states ``[rows, H]`` (source detached), in float32.

    ``*_keep`` (bool ``[H]``): the dims a member being pruned still keeps (its hidden states are 0 on the
    others); only the dims both keep count. Zero rows give a zero loss with a grad_fn.
    """
    assert source_hidden.shape == target_hidden.shape, (source_hidden.shape, target_hidden.shape)
    diff = target_hidden.float() - source_hidden.detach().float()
    keeps = [k for k in (source_keep, target_keep) if k is not None]
    if keeps:
        keep = keeps[0] & keeps[1] if len(keeps) == 2 else keeps[0]
        diff = diff * keep.to(diff.dtype)
        dims = keep.sum().clamp(min=1)
    else:
        dims = diff.shape[-1]
    return (diff * diff).sum() / (max(diff.shape[0], 1) * dims)
