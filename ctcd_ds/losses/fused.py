"""Fused bidirectional distillation loss: both KL directions of a pair in one pass over the vocabulary.

Same definition as :mod:`ctcd_ds.losses.reference` (``p = softmax(z / tau)``, batch mean over rows):

    loss_ab = weight_ab * tau**2 * KL(p_a || p_b)    grad into logits_b only: weight_ab * tau * (p_b - p_a) / N
    loss_ba = weight_ba * tau**2 * KL(p_b || p_a)    grad into logits_a only: weight_ba * tau * (p_a - p_b) / N

Both directions share ``p_a - p_b``, so one pass computes both softmaxes, both values and both gradients.

How it works
------------
Everything is computed in the forward, chunk by chunk over rows, in float32 whatever the input dtype, with
no autograd graph recorded. Each input's gradient goes into ONE gradient-sized buffer (input dtype). Each
returned loss is the output of its own tiny autograd function (:class:`_PrecomputedGradLoss`) holding only
the buffer(s) of its own gradient, so the losses have disjoint graphs: the teacher engine can call
``backward`` on ``loss_ba`` and the student engine on ``loss_ab``, in either order, without
``retain_graph``. Backward scales the stored buffer by ``grad_output`` *in place* and hands the buffer itself
to autograd (DeepSpeed's loss scaling and gradient-accumulation scaling arrive through ``grad_output``), so
the peak extra memory is one gradient-sized buffer per input plus one chunk of float32 temporaries.

The buffers are saved with ``save_for_backward``: after a backward without ``retain_graph`` autograd
releases them (and a leaf input adopts the buffer as its ``.grad`` without a copy). With
``retain_graph=True`` a later backward rescales the buffer to its own ``grad_output``, so a gradient tensor
obtained from an *earlier* backward of the same loss must not be kept and reused. On a GPU the first backward
scales a float32/bfloat16 buffer by the ``grad_output`` tensor on the device (the host never waits for it;
float16 buffers: :data:`DEVICE_SCALED_DTYPES`); a later one
(``retain_graph``) reads ``grad_output`` on the host, and refuses to rescale a buffer the first one zeroed
(a zero or non-finite ``grad_output``: the gradient is gone). On the CPU every backward reads it on the host,
where that costs nothing, and a zero first ``grad_output`` leaves the buffer intact.

float16: a gradient such as ``tau * (p_b - p_a) / N`` underflows float16 before any loss scale is applied,
so float16 buffers hold the gradient times a known factor (``(p_a - p_b) * 1024``, or without its ``1/N``)
and backward applies the remaining factor together with ``grad_output``. float32, bfloat16 and float64
buffers hold the gradient itself.

On CPU, row ranges run on worker threads with single-threaded torch ops (:mod:`ctcd_ds.losses.cpu_pool`),
each chunk's ``[rows, V]`` buffers staying in cache.

Back ends: the torch chunked path here runs on any device; on CUDA tensors with Triton installed the kernel
in :mod:`ctcd_ds.losses.triton_kd` is used (``backend="auto"``). ``backend="torch"`` forces the torch
path, ``backend="triton"`` requires the kernel. float64 inputs (gradcheck) use an unchunked float64 path.

The LM-head variant, which also folds in the output-layer matmul and both MLM cross-entropies, is
:func:`ctcd_ds.losses.fused_linear.fused_linear_bidirectional_kl`; it reuses the autograd function and the
chunk math below.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from ctcd_ds.losses import triton_kd
from ctcd_ds.losses.cpu_pool import row_parallel

BACKENDS = ("auto", "torch", "triton")

DEFAULT_CHUNK_BYTES = 4 * 2**20
"""Budget for one chunk's float32 ``[rows, V]`` temporaries in :func:`bidirectional_kl` (4 buffers, per
worker thread): small, so that a chunk's buffers stay in the CPU cache (8 rows at V=30522)."""

CUDA_CHUNK_BYTES = 512 * 2**20
""":data:`DEFAULT_CHUNK_BYTES` on a GPU (the torch path, without Triton): a few large chunks, as launches
rather than caches are what small chunks cost there."""

FP16_GRAD_MULTIPLIER = 1024.0
"""float16 buffers of :func:`bidirectional_kl` hold ``(p_a - p_b) * 1024`` (magnitude <= 1024)."""


class BidirectionalKL(NamedTuple):
    """Result of :func:`bidirectional_kl`. All are float32 scalars (float64 for float64 inputs)."""

    loss_ab: torch.Tensor
    """``weight_ab * tau^2 * KL(p_a || p_b)``; backward puts the gradient into ``logits_b`` only."""
    loss_ba: torch.Tensor
    """``weight_ba * tau^2 * KL(p_b || p_a)``; backward puts the gradient into ``logits_a`` only."""
    kl_ab: torch.Tensor
    """Detached, unweighted ``tau^2 * KL(p_a || p_b)`` (for logging)."""
    kl_ba: torch.Tensor
    """Detached, unweighted ``tau^2 * KL(p_b || p_a)`` (for logging)."""


# --------------------------------------------------------------------------------------------------
# Autograd: a scalar whose gradients were computed in the forward.
# --------------------------------------------------------------------------------------------------


class _PrecomputedGradLoss(torch.autograd.Function):
    """``value`` (a detached scalar) whose gradient w.r.t. ``targets[i]`` is ``grads[i] * scales[i]``.

    ``grads[i]`` is None where the gradient is zero / not wanted. Backward multiplies the stored buffer by
    ``grad_output * scales[i]`` in place and returns the buffer itself (no second gradient-sized tensor).
    """

    @staticmethod
    def forward(ctx, value, grads, scales, *targets):
        ctx.present = tuple(g is not None for g in grads)
        ctx.scales = tuple(float(s) for s in scales)
        ctx.applied = [1.0] * len(grads)  # buffer i currently holds gradient * applied[i] / scales[i]
        ctx.save_for_backward(*(g for g in grads if g is not None))
        return value.detach().clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        saved = iter(ctx.saved_tensors)
        first = not hasattr(ctx, "backwards")
        ctx.backwards = getattr(ctx, "backwards", 0) + 1
        on_device = (
            first
            and grad_output.device.type not in HOST_READ_DEVICES
            and all(b.dtype in DEVICE_SCALED_DTYPES for b in ctx.saved_tensors)
        )
        g = None if on_device else float(grad_output)
        out = []
        for i, present in enumerate(ctx.present):
            buf = next(saved) if present else None
            if buf is None or not ctx.needs_input_grad[3 + i]:
                out.append(None)
            elif on_device:
                out.append(_PrecomputedGradLoss._scale_on_device(ctx, i, buf, grad_output))
            else:
                out.append(_PrecomputedGradLoss._rescale_on_host(ctx, i, buf, g))
        return (None, None, None, *out)

    @staticmethod
    def _rescale_on_host(ctx, i, buf, g):
        """Buffer ``i`` scaled to ``g * scale``, ``g`` read on the host."""
        want, have = g * ctx.scales[i], float(ctx.applied[i])
        if have == 0.0 or not math.isfinite(have):
            raise RuntimeError(
                "backward through a retained fused KD loss whose first backward had a zero or non-finite "
                "grad_output on the device: that gradient buffer was scaled to it in place"
            )
        if want == have:
            return buf
        if want != 0.0 and math.isfinite(want):
            # .data: rescale without bumping the saved tensor's version (a retained graph stays usable)
            buf.data.mul_(want / have)
            ctx.applied[i] = want
            return buf
        return buf * (want / have)  # zero or non-finite grad_output: leave the buffer intact, hand autograd a new one

    @staticmethod
    def _scale_on_device(ctx, i, buf, grad_output):
        """First backward on an accelerator: buffer ``i`` scaled in place by ``grad_output * scale``, a device
        tensor; nothing is read on the host."""
        factor = grad_output.detach().to(torch.float64 if buf.dtype == torch.float64 else torch.float32)
        factor = factor * ctx.scales[i]
        buf.data.mul_(factor)
        ctx.applied[i] = factor
        return buf


HOST_READ_DEVICES = ("cpu",)
"""Device types on which backward reads ``grad_output`` on the host (free there); on any other the first
backward scales on the device."""

DEVICE_SCALED_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
"""Buffers the first backward may scale on the device. A GPU kernel multiplies a bfloat16 buffer by the factor
rounded to bfloat16 (relative error at most 2**-9, the precision of the bfloat16 gradient itself); a float16
buffer holds its gradient times 1024 / N, and a factor of order N / 1024 x a loss scale x a weight rounded to
float16 could underflow, so float16 keeps the host read (its loss scaling reads the device every step anyway)."""


def precomputed_grad_loss(
    value: torch.Tensor, grads: Sequence, scales: Sequence[float], targets: Sequence
) -> torch.Tensor:
    """``value`` wrapped so that backward delivers ``grads`` into ``targets``; detached if nothing needs grad."""
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in targets):
        return value.detach()
    return _PrecomputedGradLoss.apply(value, tuple(grads), tuple(scales), *targets)


# --------------------------------------------------------------------------------------------------
# Chunk math (torch), shared with ctcd_ds.losses.fused_linear.
# --------------------------------------------------------------------------------------------------


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """Whether ``backend`` means the Triton kernel for these tensors; raises if it was asked for and cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "triton":
        if not triton_kd.TRITON_AVAILABLE:
            raise RuntimeError("backend='triton' but triton is not installed")
        if not on_cuda:
            raise ValueError("backend='triton' needs CUDA tensors")
        return True
    return backend == "auto" and on_cuda and triton_kd.TRITON_AVAILABLE


def rows_per_chunk(chunk_rows: int | None, n_rows: int, vocab: int, buffers: int, budget: int) -> int:
    """Rows per chunk: ``chunk_rows``, or as many as fit ``buffers`` float32 ``[rows, vocab]`` in ``budget``."""
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows} must be >= 1")
    c = chunk_rows if chunk_rows is not None else budget // (buffers * 4 * max(vocab, 1))
    return max(1, min(int(c), n_rows))


def _scaled_f32(src: torch.Tensor, inv_tau: float, out: torch.Tensor) -> torch.Tensor:
    """``out = float32(src) * inv_tau`` (exact conversion first: a bf16 ``mul`` would round the product)."""
    if src.dtype == out.dtype and inv_tau != 1.0:
        return torch.mul(src, inv_tau, out=out)
    out.copy_(src)
    return out.mul_(inv_tau) if inv_tau != 1.0 else out


def softmax_lse(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = softmax(x, -1)``; returns the rows' log-sum-exp of ``x``.

    The fused softmax kernel is cheaper on CPU than ``exp`` alone. The log-sum-exp follows from the
    largest probability, ``lse = max(x) - log(max(p))``, well conditioned because ``max(p) >= 1/V``.
    """
    torch.ops.aten._softmax.out(x, -1, False, out=out)
    return x.amax(-1).sub_(out.amax(-1).log_())


def kl_chunk(xa, xb, pa, pb, kl_ab, kl_ba) -> torch.Tensor:
    """Rows' ``KL(p_a||p_b)``, ``KL(p_b||p_a)`` into ``kl_ab``, ``kl_ba``; returns ``p_a - p_b`` (in ``pa``).

    ``xa``, ``xb``: ``z / tau`` (overwritten); ``pa``, ``pb``: receive the softmaxes.
    ``KL(p_a||p_b) = sum p_a * (x_a - x_b) - (lse_a - lse_b)``, and symmetrically. No allocation of
    ``[rows, V]`` size: the products go into ``xb``, free once ``x_a - x_b`` is in ``xa``.
    """
    shift = softmax_lse(xa, pa).sub_(softmax_lse(xb, pb))
    dx = xa.sub_(xb)
    torch.sum(torch.mul(pa, dx, out=xb), -1, out=kl_ab)
    kl_ab.sub_(shift)
    torch.sum(torch.mul(pb, dx, out=xb), -1, out=kl_ba)
    kl_ba.neg_().add_(shift)
    return pa.sub_(pb)


# --------------------------------------------------------------------------------------------------
# bidirectional_kl
# --------------------------------------------------------------------------------------------------


def _torch_rows(za, zb, rows, inv_tau, ka, kb, grad_a, grad_b, kl_ab_rows, kl_ba_rows, chunk_rows) -> None:
    """Torch chunked pass over ``rows`` (LongTensor of row indices, or None = all rows in order).

    Writes ``grad_a = (p_a - p_b) * ka`` and ``grad_b = (p_a - p_b) * kb`` (those not None) at those rows
    and the rows' KL values into ``kl_*_rows`` (indexed by position in ``rows``)."""
    args = (za, zb, rows, inv_tau, ka, kb, grad_a, grad_b, kl_ab_rows, kl_ba_rows, chunk_rows)
    row_parallel(za.device, kl_ab_rows.numel(), 1, lambda p0, p1: _torch_rows_range(*args, p0, p1))


def _torch_rows_range(za, zb, rows, inv_tau, ka, kb, grad_a, grad_b, kl_ab_rows, kl_ba_rows, c, p0, p1) -> None:
    """:func:`_torch_rows` for the positions ``[p0, p1)`` of ``rows``, ``c`` rows at a time."""
    vocab = za.shape[1]
    xa, xb, pa, pb = (torch.empty(min(c, p1 - p0), vocab, dtype=torch.float32, device=za.device) for _ in range(4))
    for s in range(p0, p1, c):
        e = min(s + c, p1)
        k = e - s
        if rows is None:
            src_a, src_b = za[s:e], zb[s:e]
        else:
            idx = rows[s:e]
            src_a, src_b = za.index_select(0, idx), zb.index_select(0, idx)
        diff = kl_chunk(
            _scaled_f32(src_a, inv_tau, xa[:k]),
            _scaled_f32(src_b, inv_tau, xb[:k]),
            pa[:k],
            pb[:k],
            kl_ab_rows[s:e],
            kl_ba_rows[s:e],
        )
        if rows is not None:
            if grad_a is not None:
                grad_a.index_copy_(0, idx, (diff * ka).to(grad_a.dtype))
            if grad_b is not None:
                grad_b.index_copy_(0, idx, (diff * kb).to(grad_b.dtype))
        elif grad_a is not None and grad_b is not None and grad_a.dtype == torch.float32:
            torch.mul(diff, ka, out=grad_a[s:e])  # grad_b = grad_a * (kb/ka): exact enough in float32
            torch.mul(grad_a[s:e], kb / ka, out=grad_b[s:e])
        else:
            if grad_a is not None:
                torch.mul(diff, ka, out=grad_a[s:e])
            if grad_b is not None:
                torch.mul(diff, kb, out=grad_b[s:e])


def _float64_rows(za, zb, rows, inv_tau, ka, kb, grad_a, grad_b, kl_ab_rows, kl_ba_rows) -> None:
    """float64 inputs (gradcheck): the same quantities, unchunked, in float64."""
    if rows is not None:
        za, zb = za.index_select(0, rows), zb.index_select(0, rows)
    la, lb = torch.log_softmax(za * inv_tau, -1), torch.log_softmax(zb * inv_tau, -1)
    pa, pb = la.exp(), lb.exp()
    kl_ab_rows.copy_((pa * (la - lb)).sum(-1))
    kl_ba_rows.copy_((pb * (lb - la)).sum(-1))
    diff = pa - pb
    for grad, k in ((grad_a, ka), (grad_b, kb)):
        if grad is not None:
            if rows is None:
                grad.copy_(diff * k)
            else:
                grad.index_copy_(0, rows, diff * k)


def bidirectional_kl(
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    temperature: float,
    weight_ab: float = 1.0,
    weight_ba: float = 1.0,
    row_mask: torch.Tensor | None = None,
    chunk_rows: int | None = None,
    backend: str = "auto",
) -> BidirectionalKL:
    """Both distillation directions of a pair, as two losses with disjoint graphs.

    Args:
        logits_a, logits_b: ``[N, V]`` logits of models a and b at the same rows (float32, bfloat16,
            float16: math in float32; float64: math in float64).
        temperature: ``tau > 0``.
        weight_ab, weight_ba: multipliers of ``loss_ab`` / ``loss_ba``. A zero weight skips that gradient
            (the loss keeps a ``grad_fn``, which delivers no (= zero) gradient).
        row_mask: optional bool ``[N]``; rows where it is False contribute nothing and get a zero gradient,
            and the mean is over the valid rows. No valid row: both losses are 0 with zero gradients.
        chunk_rows: rows per chunk (default: :data:`DEFAULT_CHUNK_BYTES` of float32 temporaries).
        backend: ``"auto"`` (Triton on CUDA when installed, else torch), ``"torch"`` or ``"triton"``.

    Returns:
        :class:`BidirectionalKL` ``(loss_ab, loss_ba, kl_ab, kl_ba)``: ``loss_ab`` reaches only
        ``logits_b``, ``loss_ba`` only ``logits_a``; ``kl_*`` are detached and unweighted.
    """
    if logits_a.dim() != 2 or logits_a.shape != logits_b.shape:
        raise ValueError(f"logits must both be [N, V]: got {tuple(logits_a.shape)} and {tuple(logits_b.shape)}")
    if logits_a.device != logits_b.device or logits_a.dtype != logits_b.dtype:
        raise ValueError(
            f"logits differ in device/dtype: {logits_a.device}/{logits_a.dtype} vs {logits_b.device}/{logits_b.dtype}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    triton = use_triton(backend, logits_a, logits_b)
    n_rows, vocab = logits_a.shape
    tau = float(temperature)
    grad_on = torch.is_grad_enabled()
    need_a = grad_on and logits_a.requires_grad and weight_ba != 0
    need_b = grad_on and logits_b.requires_grad and weight_ab != 0

    rows, n_valid = None, n_rows
    if row_mask is not None:
        if row_mask.shape != (n_rows,) or row_mask.dtype != torch.bool:
            raise ValueError(f"row_mask must be bool [{n_rows}], got {row_mask.dtype} {tuple(row_mask.shape)}")
        rows = row_mask.to(logits_a.device).nonzero().squeeze(1)
        n_valid = rows.numel()
        if n_valid == n_rows:
            rows = None

    za, zb = logits_a.detach(), logits_b.detach()
    if n_valid == 0 or vocab == 0:
        zero = torch.zeros((), dtype=torch.float64 if za.dtype == torch.float64 else torch.float32, device=za.device)
        grad_a = torch.zeros_like(za) if need_a else None
        grad_b = torch.zeros_like(zb) if need_b else None
        return BidirectionalKL(
            precomputed_grad_loss(zero, [grad_b], [1.0], [logits_b]),
            precomputed_grad_loss(zero, [grad_a], [1.0], [logits_a]),
            zero,
            zero.clone(),
        )

    # true gradient = (p_a - p_b) * k_x; the buffer holds (p_a - p_b) * store_x, backward applies k_x / store_x
    k_a = weight_ba * tau / n_valid
    k_b = -weight_ab * tau / n_valid
    fp16 = za.dtype == torch.float16
    store_a = math.copysign(FP16_GRAD_MULTIPLIER, k_a) if fp16 else k_a
    store_b = math.copysign(FP16_GRAD_MULTIPLIER, k_b) if fp16 else k_b
    alloc = torch.empty if rows is None else torch.zeros
    grad_a = alloc(za.shape, dtype=za.dtype, device=za.device) if need_a else None
    grad_b = alloc(zb.shape, dtype=zb.dtype, device=zb.device) if need_b else None
    acc = torch.float64 if za.dtype == torch.float64 else torch.float32
    kl_ab_rows = torch.empty(n_valid, dtype=acc, device=za.device)
    kl_ba_rows = torch.empty(n_valid, dtype=acc, device=za.device)

    with torch.no_grad():
        args = (za, zb, rows, 1.0 / tau, store_a, store_b, grad_a, grad_b, kl_ab_rows, kl_ba_rows)
        if acc == torch.float64:
            _float64_rows(*args)
        elif triton:
            triton_kd.bidirectional_kl_rows(*args)
        else:
            budget = DEFAULT_CHUNK_BYTES if za.device.type == "cpu" else CUDA_CHUNK_BYTES
            _torch_rows(*args, rows_per_chunk(chunk_rows, n_valid, vocab, 4, budget))
        kl_ab = kl_ab_rows.sum() * (tau * tau / n_valid)  # float32 (float64 for float64 inputs)
        kl_ba = kl_ba_rows.sum() * (tau * tau / n_valid)

    loss_ab = precomputed_grad_loss(kl_ab * weight_ab, [grad_b], [k_b / store_b if need_b else 1.0], [logits_b])
    loss_ba = precomputed_grad_loss(kl_ba * weight_ba, [grad_a], [k_a / store_a if need_a else 1.0], [logits_a])
    return BidirectionalKL(loss_ab, loss_ba, kl_ab, kl_ba)
