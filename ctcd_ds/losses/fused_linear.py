"""Fused LM head + bidirectional distillation: :func:`fused_linear_bidirectional_kl`.

For two models with hidden states ``h_x`` at the same (masked) rows and decoder ``W_x``, ``b_x``, one chunked
pass computes both LM-head matmuls, both MLM cross-entropies and both KL directions of
:func:`ctcd_ds.losses.fused.bidirectional_kl`, with all gradients, so the ``N x V`` logits are never
materialised. The KL math per chunk and the autograd wrapper (each term its own graph, the gradients
computed in the forward) are those of :mod:`ctcd_ds.losses.fused`; the elementwise phases of a chunk run
on CPU worker threads (:mod:`ctcd_ds.losses.cpu_pool`), its GEMMs with all of torch's intra-op threads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import torch

from ctcd_ds.losses import triton_kd
from ctcd_ds.losses.cpu_pool import row_parallel
from ctcd_ds.losses.fused import kl_chunk, precomputed_grad_loss, rows_per_chunk, softmax_lse, use_triton

DEFAULT_LINEAR_CHUNK_BYTES = 40 * 2**20
"""Budget for one chunk's float32 ``[rows, V]`` temporaries in :func:`fused_linear_bidirectional_kl`
(4 buffers): 85 rows at V=30522. Every chunk streams each ``[V, H]`` weight and weight-gradient matrix
through its GEMMs, so larger chunks are faster (fewer passes over them) and cost memory."""

CUDA_LINEAR_CHUNK_BYTES = 128 * 2**20
""":data:`DEFAULT_LINEAR_CHUNK_BYTES` on a GPU: larger GEMMs per chunk."""


class LinearBidirectionalKL(NamedTuple):
    """Result of :func:`fused_linear_bidirectional_kl`. All are float32 scalars (float64 for float64 inputs).

    Model a's loss is ``mlm_a + loss_ba`` and model b's is ``mlm_b + loss_ab``; each of the four terms has
    its own graph, reaching only its own model's tensors."""

    mlm_a: torch.Tensor
    """Mean cross-entropy of model a over labelled rows; gradient into hidden_a, weight_a, bias_a."""
    mlm_b: torch.Tensor
    """Mean cross-entropy of model b over labelled rows; gradient into hidden_b, weight_b, bias_b."""
    loss_ab: torch.Tensor
    """``weight_ab * tau^2 * KL(p_a || p_b)``; gradient into hidden_b, weight_b, bias_b."""
    loss_ba: torch.Tensor
    """``weight_ba * tau^2 * KL(p_b || p_a)``; gradient into hidden_a, weight_a, bias_a."""
    kl_ab: torch.Tensor
    """Detached, unweighted ``tau^2 * KL(p_a || p_b)``."""
    kl_ba: torch.Tensor
    """Detached, unweighted ``tau^2 * KL(p_b || p_a)``."""


class _Side:
    """One model's LM head and its gradient accumulators, per loss term (``"mlm"``, ``"kd"``)."""

    def __init__(self, hidden, weight, bias, terms: Sequence[str]):
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.h, self.w = hidden.detach(), weight.detach()
        self.b = bias.detach() if bias is not None else None
        self.acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        self.acc_w = torch.float64 if weight.dtype == torch.float64 else torch.float32
        self.grads: dict[str, list] = {}
        for term in terms:
            dh = torch.empty_like(self.h) if hidden.requires_grad else None
            dw = torch.zeros(weight.shape, dtype=self.acc_w, device=weight.device) if weight.requires_grad else None
            db = (
                torch.zeros(bias.shape, dtype=self.acc_w, device=bias.device)
                if bias is not None and bias.requires_grad
                else None
            )
            self.grads[term] = [dh, dw, db]

    def logits(self, s: int, e: int, out: torch.Tensor) -> torch.Tensor:
        """``out = h[s:e] @ W.T + b``, computed in the model dtype (as the reference does), stored float32/64."""
        h = self.h[s:e]
        if self.h.dtype == out.dtype:
            if self.b is None:
                return torch.mm(h, self.w.t(), out=out)
            return torch.addmm(self.b, h, self.w.t(), out=out)
        return out.copy_(torch.addmm(self.b, h, self.w.t()) if self.b is not None else h @ self.w.t())

    def accumulate(self, term: str, g: torch.Tensor, s: int, e: int, alpha: float) -> None:
        """Add the contribution of the logits-gradient chunk ``alpha * g`` (``[e - s, V]``, float32/64)."""
        if term not in self.grads:
            return
        dh, dw, db = self.grads[term]
        if dh is not None:
            if dh.dtype == g.dtype:
                torch.mm(g, self.w, out=dh[s:e]).mul_(alpha)
            else:  # like autograd: the logits gradient cast to the model dtype, matmul in the model dtype
                part = g.to(dh.dtype) @ self.w
                # float16 keeps the 1/N-type factor out of the buffer (applied in backward, see finish)
                dh[s:e] = part if dh.dtype == torch.float16 else part * alpha
        if dw is not None:
            h = self.h[s:e]
            dw.addmm_(g.t().to(dw.dtype), h if h.dtype == dw.dtype else h.to(dw.dtype), alpha=alpha)
        if db is not None:
            db.add_(g.sum(0).to(db.dtype), alpha=alpha)

    def finish(self, term: str, alpha: float) -> tuple[list, list]:
        """``(grads, scales)`` of a term for :func:`~.fused.precomputed_grad_loss`: true gradient = buffer * scale."""
        if term not in self.grads:
            return [None, None, None], [1.0, 1.0, 1.0]
        dh, dw, db = self.grads.pop(term)
        grads = [dh, None, None]
        scales = [alpha if dh is not None and dh.dtype == torch.float16 else 1.0, 1.0, 1.0]
        for i, (acc, like) in enumerate(((dw, self.weight), (db, self.bias)), start=1):
            if acc is None:
                continue
            if acc.dtype == like.dtype:
                grads[i] = acc
            elif like.dtype == torch.float16:  # power-of-two scaling: largest entry ~ 2^14
                amax = float(acc.abs().max()) if acc.numel() else 0.0
                mult = 2.0 ** (14 - math.ceil(math.log2(amax))) if 0 < amax < math.inf else 1.0
                grads[i], scales[i] = (acc * mult).to(like.dtype), 1.0 / mult
            else:
                grads[i] = acc.to(like.dtype)
        return grads, scales


def fused_linear_bidirectional_kl(
    hidden_a: torch.Tensor,
    weight_a: torch.Tensor,
    bias_a: torch.Tensor | None,
    hidden_b: torch.Tensor,
    weight_b: torch.Tensor,
    bias_b: torch.Tensor | None,
    labels: torch.Tensor,
    temperature: float,
    weight_ab: float = 1.0,
    weight_ba: float = 1.0,
    chunk_rows: int | None = None,
    backend: str = "auto",
) -> LinearBidirectionalKL:
    """LM head + both MLM cross-entropies + both KL directions, never materialising the ``N x V`` logits.

    Equivalent to ``z_x = hidden_x @ weight_x.T + bias_x`` (in the inputs' dtype), then
    ``mlm_x = cross_entropy(z_x.float(), labels, ignore_index=-100)`` (mean over labelled rows; 0, not
    NaN, when no row is labelled) and :func:`~.fused.bidirectional_kl` on ``(z_a, z_b)`` over all ``N``
    rows.

    Args:
        hidden_a, hidden_b: ``[N, H_a]``, ``[N, H_b]`` hidden states at the masked rows, after the MLM head
            transform. weight_a, weight_b: decoder weights ``[V, H_x]``. bias_a, bias_b: ``[V]`` or None.
        labels: int64 ``[N]``; -100 = row ignored by the cross-entropies (it still counts for the KL).
        temperature, weight_ab, weight_ba: as in :func:`~.fused.bidirectional_kl` (the cross-entropies use
            tau = 1).
        chunk_rows: rows per chunk (default: :data:`DEFAULT_LINEAR_CHUNK_BYTES` of float32 temporaries).
        backend: for the KL part of each chunk, as in :func:`~.fused.bidirectional_kl`.

    Gradients: all computed in the forward, chunk by chunk. For each model and each of its two terms the
    gradients w.r.t. that model's (hidden, weight, bias) go into separate buffers (model a: grad of
    ``mlm_a`` and grad of ``loss_ba``; model b: ``mlm_b`` and ``loss_ab``), and each of the four returned
    terms is its own :func:`~.fused.precomputed_grad_loss` holding only its own buffers. So every term
    backpropagates independently, with any ``grad_output``, in any order, without ``retain_graph``, and reaches
    only its own model. The price of that independence: a second ``[V, H]`` weight-gradient (and ``[N, H]`` hidden-
    gradient) buffer per model, and two GEMMs each for the hidden and the weight gradients: 10 N*V*H
    multiply-adds per model where autograd on materialised logits does 6. On a CPU, where those GEMMs
    dominate, it is therefore about as fast as the reference; what it saves is the ``N x V`` memory.

    Memory: the chunk's 4 float32 ``[rows, V]`` buffers plus the gradient buffers above (float32
    accumulators for the weight/bias gradients of bfloat16/float16 weights).
    """
    for name, h, w in (("a", hidden_a, weight_a), ("b", hidden_b, weight_b)):
        if h.dim() != 2 or w.dim() != 2 or h.shape[1] != w.shape[1]:
            raise ValueError(f"model {name}: hidden {tuple(h.shape)} and weight {tuple(w.shape)} do not match")
    if hidden_a.shape[0] != hidden_b.shape[0] or weight_a.shape[0] != weight_b.shape[0]:
        raise ValueError(
            f"models disagree on rows or vocab: hidden {tuple(hidden_a.shape)} vs {tuple(hidden_b.shape)}, "
            f"weight {tuple(weight_a.shape)} vs {tuple(weight_b.shape)}"
        )
    n_rows, vocab = hidden_a.shape[0], weight_a.shape[0]
    if labels.shape != (n_rows,):
        raise ValueError(f"labels must be [{n_rows}], got {tuple(labels.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    triton = use_triton(backend, hidden_a, hidden_b)
    tau = float(temperature)
    inv_tau = 1.0 / tau
    dev = hidden_a.device
    labels = labels.to(dev)
    labelled = labels != -100
    n_lab = int(labelled.sum())
    all_labelled = n_lab == n_rows

    def terms(tensors, weight):
        if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)):
            return ()
        return (("mlm",) if n_lab > 0 else ()) + (("kd",) if weight != 0 and n_rows > 0 else ())

    a_tensors, b_tensors = (hidden_a, weight_a, bias_a), (hidden_b, weight_b, bias_b)
    side_a = _Side(*a_tensors, terms(a_tensors, weight_ba))
    side_b = _Side(*b_tensors, terms(b_tensors, weight_ab))

    k_a = weight_ba * tau / max(n_rows, 1)  # d loss_ba / d z_a = (p_a - p_b) * k_a
    k_b = -weight_ab * tau / max(n_rows, 1)  # d loss_ab / d z_b = (p_a - p_b) * k_b
    m_mlm = 1.0 / max(n_lab, 1)  # d mlm_x / d z_x = (softmax(z_x) - onehot) * m_mlm on labelled rows

    acc = side_a.acc
    budget = DEFAULT_LINEAR_CHUNK_BYTES if dev.type == "cpu" else CUDA_LINEAR_CHUNK_BYTES
    c = rows_per_chunk(chunk_rows, max(n_rows, 1), vocab, 4, budget)
    ce_sum = torch.zeros(2, dtype=acc, device=dev)
    kl_sum = torch.zeros(2, dtype=acc, device=dev)
    ce_rows = torch.zeros(2, c, dtype=acc, device=dev)
    kl_rows = torch.empty(2, c, dtype=acc, device=dev)
    # the chunk's only [rows, V] buffers: logits of a and b, then probabilities / logits gradients of a and b
    z_buf, q_buf = (torch.empty(2, c, vocab, dtype=acc, device=dev) for _ in range(2))
    minus_one = torch.full((c, 1), -1.0, dtype=acc, device=dev)

    def cross_entropy(z, q, lab, lab_ok, r0: int, r1: int) -> None:
        """Rows r0:r1 of a chunk: ce = lse(z) - z[label] (tau = 1) and its logits gradient softmax(z) - onehot."""
        for j, side in enumerate((side_a, side_b)):
            zr, qr, lr = z[j][r0:r1], q[j][r0:r1], lab[r0:r1]
            torch.sub(softmax_lse(zr, qr), zr.gather(1, lr).squeeze(1), out=ce_rows[j, r0:r1])
            if "mlm" in side.grads:
                qr.scatter_add_(1, lr, minus_one[: r1 - r0])
                if not all_labelled:
                    qr.mul_(lab_ok[r0:r1].unsqueeze(1))

    def kl(z, q, r0: int, r1: int) -> None:
        """Rows r0:r1 of a chunk: both KL directions at temperature tau; p_a - p_b lands in q[0]."""
        xa, xb = z[0][r0:r1], z[1][r0:r1]
        if tau != 1.0:  # z is not needed any more: scale in place
            xa.mul_(inv_tau)
            xb.mul_(inv_tau)
        if triton and acc == torch.float32:
            triton_kd.bidirectional_kl_rows(
                xa, xb, None, 1.0, 1.0, -1.0, q[0][r0:r1], None, kl_rows[0, r0:r1], kl_rows[1, r0:r1]
            )
        else:
            kl_chunk(xa, xb, q[0][r0:r1], q[1][r0:r1], kl_rows[0, r0:r1], kl_rows[1, r0:r1])

    with torch.no_grad():
        for s in range(0, n_rows, c):
            e = min(s + c, n_rows)
            k = e - s
            lab = labels[s:e].clamp(min=0).unsqueeze(1)
            lab_ok = labelled[s:e]
            z = (side_a.logits(s, e, z_buf[0, :k]), side_b.logits(s, e, z_buf[1, :k]))  # GEMMs: all threads
            q = (q_buf[0, :k], q_buf[1, :k])

            # elementwise phases on worker threads (CPU), weight-gradient GEMMs with all intra-op threads
            if n_lab > 0:
                row_parallel(dev, k, 4, partial(cross_entropy, z, q, lab, lab_ok))
                ce_sum += ce_rows[:, :k].sum(1) if all_labelled else (ce_rows[:, :k] * lab_ok).sum(1)
                side_a.accumulate("mlm", q[0], s, e, m_mlm)
                side_b.accumulate("mlm", q[1], s, e, m_mlm)
            row_parallel(dev, k, 4, partial(kl, z, q))
            kl_sum += kl_rows[:, :k].sum(1)
            side_a.accumulate("kd", q[0], s, e, k_a)
            side_b.accumulate("kd", q[0], s, e, k_b)
        del z_buf, q_buf

        mlm = ce_sum * m_mlm  # float32 (float64 for float64 inputs)
        kl = kl_sum * (tau * tau / max(n_rows, 1))

    ga_mlm, sa_mlm = side_a.finish("mlm", m_mlm)
    ga_kd, sa_kd = side_a.finish("kd", k_a)
    gb_mlm, sb_mlm = side_b.finish("mlm", m_mlm)
    gb_kd, sb_kd = side_b.finish("kd", k_b)
    kl_ab, kl_ba = kl[0].clone(), kl[1].clone()
    return LinearBidirectionalKL(
        mlm_a=precomputed_grad_loss(mlm[0].clone(), ga_mlm, sa_mlm, a_tensors),
        mlm_b=precomputed_grad_loss(mlm[1].clone(), gb_mlm, sb_mlm, b_tensors),
        loss_ab=precomputed_grad_loss(kl_ab * weight_ab, gb_kd, sb_kd, b_tensors),
        loss_ba=precomputed_grad_loss(kl_ba * weight_ba, ga_kd, sa_kd, a_tensors),
        kl_ab=kl_ab,
        kl_ba=kl_ba,
    )
