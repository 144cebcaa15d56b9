"""Fused bidirectional distillation losses: both KL directions of a pair in one pass over the vocabulary.

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
obtained from an *earlier* backward of the same loss must not be kept and reused. ``backward`` reads
``grad_output`` with ``float()`` (one device sync per loss on CUDA).

float16: a gradient such as ``tau * (p_b - p_a) / N`` underflows float16 before any loss scale is applied,
so float16 buffers hold the gradient times a known factor (``(p_a - p_b) * 1024``, or without its ``1/N``)
and backward applies the remaining factor together with ``grad_output``. float32, bfloat16 and float64
buffers hold the gradient itself.

On CPU, row ranges run on ``torch.get_num_threads()`` worker threads with single-threaded torch ops (no
OpenMP barrier per op; see :func:`_row_parallel`), each chunk's ``[rows, V]`` buffers staying in cache.

Back ends: the torch chunked path here runs on any device; on CUDA tensors with Triton installed the kernel
in :mod:`ctcd_ds.losses.triton_kd` is used (``backend="auto"``). ``backend="torch"`` forces the torch
path, ``backend="triton"`` requires the kernel. float64 inputs (gradcheck) use an unchunked float64 path.

:func:`fused_linear_bidirectional_kl` also folds in the LM-head matmul and both MLM cross-entropies, so the
``N x V`` logits are never materialised (see its docstring).
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, NamedTuple, Sequence

import torch
from torch.autograd.function import once_differentiable

from ctcd_ds.losses import triton_kd

BACKENDS = ("auto", "torch", "triton")

DEFAULT_CHUNK_BYTES = 4 * 2**20
"""Budget for one chunk's float32 ``[rows, V]`` temporaries in :func:`bidirectional_kl` (4 buffers, per
worker). Small chunks stay in cache: on the 2-core CPU 8 rows at V=30522 (this budget) beat 32 and 128."""

DEFAULT_LINEAR_CHUNK_BYTES = 40 * 2**20
"""Budget for one chunk's float32 ``[rows, V]`` temporaries in :func:`fused_linear_bidirectional_kl`
(4 buffers): 85 rows at V=30522. Every chunk streams each ``[V, H]`` weight and weight-gradient matrix
through its GEMMs, so larger chunks are faster (fewer passes over them) and cost memory."""

CUDA_CHUNK_BYTES = 512 * 2**20
""":data:`DEFAULT_CHUNK_BYTES` on a GPU (the torch path, without Triton): a few large chunks, as launches
rather than caches are what small chunks cost there."""

CUDA_LINEAR_CHUNK_BYTES = 128 * 2**20
""":data:`DEFAULT_LINEAR_CHUNK_BYTES` on a GPU: larger GEMMs per chunk."""

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


# --------------------------------------------------------------------------------------------------
# Autograd: a scalar whose gradients were computed in the forward.
# --------------------------------------------------------------------------------------------------


class _PrecomputedGradLoss(torch.autograd.Function):
    """``value`` (a detached scalar) whose gradient w.r.t. ``targets[i]`` is ``grads[i] * scales[i]``.

    ``grads[i]`` is None where the gradient is zero / not wanted. Backward multiplies the stored buffer by
    ``grad_output * scales[i]`` in place and returns the buffer itself (no second gradient-sized tensor).
    """

    @staticmethod
    def forward(ctx, value, grads, scales, *targets):  # noqa: D102 (autograd API)
        ctx.present = tuple(g is not None for g in grads)
        ctx.scales = tuple(float(s) for s in scales)
        ctx.applied = [1.0] * len(grads)  # buffer i currently holds gradient * applied[i] / scales[i]
        ctx.save_for_backward(*(g for g in grads if g is not None))
        return value.detach().clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):  # noqa: D102 (autograd API)
        saved = iter(ctx.saved_tensors)
        g = float(grad_output)
        out = []
        for i, present in enumerate(ctx.present):
            buf = next(saved) if present else None
            if buf is None or not ctx.needs_input_grad[3 + i]:
                out.append(None)
                continue
            want, have = g * ctx.scales[i], ctx.applied[i]
            if want == have:
                out.append(buf)
            elif want != 0.0 and math.isfinite(want):
                # .data: rescale without bumping the saved tensor's version (a retained graph stays usable)
                buf.data.mul_(want / have)
                ctx.applied[i] = want
                out.append(buf)
            else:  # zero or non-finite grad_output: leave the buffer intact, hand autograd a new tensor
                out.append(buf * (want / have))
        return (None, None, None, *out)


def _loss(value: torch.Tensor, grads: Sequence, scales: Sequence[float], targets: Sequence) -> torch.Tensor:
    """``value`` wrapped so that backward delivers ``grads`` into ``targets``; detached if nothing needs grad."""
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in targets):
        return value.detach()
    return _PrecomputedGradLoss.apply(value, tuple(grads), tuple(scales), *targets)


# --------------------------------------------------------------------------------------------------
# CPU parallelism: row ranges on worker threads, each running single-threaded torch ops.
# --------------------------------------------------------------------------------------------------
#
# The chunked path issues ~16 elementwise/reduction ops per chunk. With torch's intra-op (OpenMP) threads,
# every op is a parallel region ending in a barrier; when the cores are shared (another process, or two
# ranks on two cores) a barrier waits for a descheduled thread for a whole scheduler slice, and the loop
# became ~25x slower than single-threaded. Instead, on CPU, row ranges go to ``torch.get_num_threads()``
# Python threads (torch releases the GIL inside ops) while intra-op threads are set to 1, so there is no
# barrier per op. The intra-op setting is global: it is restored on exit, and concurrent callers of these
# functions from several Python threads are not supported.

_POOL: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, size, pool)
_POOL_LOCK = threading.Lock()


def _pool(size: int) -> ThreadPoolExecutor:
    """The persistent worker pool, rebuilt when torch's thread count changes or in a forked child (whose
    copy of the pool has no threads)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[:2] != (os.getpid(), size):
            if _POOL is not None and _POOL[0] == os.getpid():
                _POOL[2].shutdown(wait=False)
            _POOL = (os.getpid(), size, ThreadPoolExecutor(size, thread_name_prefix="ctcd-kd"))
        return _POOL[2]


@contextmanager
def _single_threaded_ops():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _row_parallel(device: torch.device, n: int, min_rows: int, fn: Callable[[int, int], None]) -> None:
    """Run ``fn(start, end)`` over ``[0, n)``: split across worker threads on CPU when worth it."""
    threads = torch.get_num_threads()
    workers = min(threads, n // max(min_rows, 1)) if device.type == "cpu" else 1
    if workers <= 1:
        fn(0, n)
        return
    step = -(-n // workers)
    pool = _pool(threads)
    with _single_threaded_ops():
        for f in [pool.submit(fn, s, min(s + step, n)) for s in range(0, n, step)]:
            f.result()


# --------------------------------------------------------------------------------------------------
# Chunk math shared by both functions (torch).
# --------------------------------------------------------------------------------------------------


def _use_triton(backend: str, *tensors: torch.Tensor) -> bool:
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


def _chunk(chunk_rows: int | None, n_rows: int, vocab: int, buffers: int, budget: int) -> int:
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


def _softmax_lse(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = softmax(x, -1)``; returns the rows' log-sum-exp of ``x``.

    The fused softmax kernel is cheaper on CPU than ``exp`` alone. The log-sum-exp follows from the
    largest probability, ``lse = max(x) - log(max(p))``, well conditioned because ``max(p) >= 1/V``.
    """
    torch.ops.aten._softmax.out(x, -1, False, out=out)
    return x.amax(-1).sub_(out.amax(-1).log_())


def _kl_chunk(xa, xb, pa, pb, kl_ab, kl_ba) -> torch.Tensor:
    """Rows' ``KL(p_a||p_b)``, ``KL(p_b||p_a)`` into ``kl_ab``, ``kl_ba``; returns ``p_a - p_b`` (in ``pa``).

    ``xa``, ``xb``: ``z / tau`` (overwritten); ``pa``, ``pb``: receive the softmaxes.
    ``KL(p_a||p_b) = sum p_a * (x_a - x_b) - (lse_a - lse_b)``, and symmetrically. No allocation of
    ``[rows, V]`` size: the products go into ``xb``, free once ``x_a - x_b`` is in ``xa``.
    """
    shift = _softmax_lse(xa, pa).sub_(_softmax_lse(xb, pb))
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
    _row_parallel(za.device, kl_ab_rows.numel(), 1, lambda p0, p1: _torch_rows_range(*args, p0, p1))


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
        diff = _kl_chunk(
            _scaled_f32(src_a, inv_tau, xa[:k]), _scaled_f32(src_b, inv_tau, xb[:k]), pa[:k], pb[:k],
            kl_ab_rows[s:e], kl_ba_rows[s:e],
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
    triton = _use_triton(backend, logits_a, logits_b)
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
            _loss(zero, [grad_b], [1.0], [logits_b]), _loss(zero, [grad_a], [1.0], [logits_a]), zero, zero.clone()
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
            _torch_rows(*args, _chunk(chunk_rows, n_valid, vocab, 4, budget))
        kl_ab = kl_ab_rows.sum() * (tau * tau / n_valid)  # float32 (float64 for float64 inputs)
        kl_ba = kl_ba_rows.sum() * (tau * tau / n_valid)

    loss_ab = _loss(kl_ab * weight_ab, [grad_b], [k_b / store_b if need_b else 1.0], [logits_b])
    loss_ba = _loss(kl_ba * weight_ba, [grad_a], [k_a / store_a if need_a else 1.0], [logits_a])
    return BidirectionalKL(loss_ab, loss_ba, kl_ab, kl_ba)


# --------------------------------------------------------------------------------------------------
# fused_linear_bidirectional_kl
# --------------------------------------------------------------------------------------------------


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
        """``(grads, scales)`` of a term for :class:`_PrecomputedGradLoss`: true gradient = buffer * scale."""
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
    NaN, when no row is labelled) and :func:`bidirectional_kl` on ``(z_a, z_b)`` over all ``N`` rows.

    Args:
        hidden_a, hidden_b: ``[N, H_a]``, ``[N, H_b]`` hidden states at the masked rows, after the MLM head
            transform. weight_a, weight_b: decoder weights ``[V, H_x]``. bias_a, bias_b: ``[V]`` or None.
        labels: int64 ``[N]``; -100 = row ignored by the cross-entropies (it still counts for the KL).
        temperature, weight_ab, weight_ba: as in :func:`bidirectional_kl` (the cross-entropy uses tau=1).
        chunk_rows: rows per chunk (default: :data:`DEFAULT_LINEAR_CHUNK_BYTES` of float32 temporaries).
        backend: for the KL part of each chunk, as in :func:`bidirectional_kl`.

    Gradients: all computed in the forward, chunk by chunk. For each model and each of its two terms the
    gradients w.r.t. that model's (hidden, weight, bias) go into separate buffers (model a: grad of
    ``mlm_a`` and grad of ``loss_ba``; model b: ``mlm_b`` and ``loss_ab``), and each of the four returned
    terms is its own :class:`_PrecomputedGradLoss` holding only its own buffers. So every term backpropagates
    independently, with any ``grad_output``, in any order, without ``retain_graph``, and reaches only its own
    model. The price of that independence: a second ``[V, H]`` weight-gradient (and ``[N, H]`` hidden-
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
    triton = _use_triton(backend, hidden_a, hidden_b)
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
    c = _chunk(chunk_rows, max(n_rows, 1), vocab, 4, budget)
    ce_sum = torch.zeros(2, dtype=acc, device=dev)
    kl_sum = torch.zeros(2, dtype=acc, device=dev)
    ce_rows = torch.zeros(2, c, dtype=acc, device=dev)
    kl_rows = torch.empty(2, c, dtype=acc, device=dev)
    # the chunk's only [rows, V] buffers: logits of a and b, then probabilities / logits gradients of a and b
    z_buf, q_buf = (torch.empty(2, c, vocab, dtype=acc, device=dev) for _ in range(2))
    minus_one = torch.full((c, 1), -1.0, dtype=acc, device=dev)

    with torch.no_grad():
        for s in range(0, n_rows, c):
            e = min(s + c, n_rows)
            k = e - s
            lab = labels[s:e].clamp(min=0).unsqueeze(1)
            lab_ok = labelled[s:e]
            z = (side_a.logits(s, e, z_buf[0, :k]), side_b.logits(s, e, z_buf[1, :k]))  # GEMMs: all threads
            q = (q_buf[0, :k], q_buf[1, :k])

            def cross_entropy(r0: int, r1: int) -> None:
                """Rows r0:r1: ce = lse(z) - z[label] (tau = 1) and its logits gradient softmax(z) - onehot."""
                for j, side in enumerate((side_a, side_b)):
                    zr, qr, lr = z[j][r0:r1], q[j][r0:r1], lab[r0:r1]
                    torch.sub(_softmax_lse(zr, qr), zr.gather(1, lr).squeeze(1), out=ce_rows[j, r0:r1])
                    if "mlm" in side.grads:
                        qr.scatter_add_(1, lr, minus_one[: r1 - r0])
                        if not all_labelled:
                            qr.mul_(lab_ok[r0:r1].unsqueeze(1))

            def kl(r0: int, r1: int) -> None:
                """Rows r0:r1: both KL directions at temperature tau; p_a - p_b lands in q[0]."""
                xa, xb = z[0][r0:r1], z[1][r0:r1]
                if tau != 1.0:  # z is not needed any more: scale in place
                    xa.mul_(inv_tau)
                    xb.mul_(inv_tau)
                if triton and acc == torch.float32:
                    triton_kd.bidirectional_kl_rows(
                        xa, xb, None, 1.0, 1.0, -1.0, q[0][r0:r1], None, kl_rows[0, r0:r1], kl_rows[1, r0:r1]
                    )
                else:
                    _kl_chunk(xa, xb, q[0][r0:r1], q[1][r0:r1], kl_rows[0, r0:r1], kl_rows[1, r0:r1])

            # elementwise phases on worker threads (CPU), weight-gradient GEMMs with all intra-op threads
            if n_lab > 0:
                _row_parallel(dev, k, 4, cross_entropy)
                ce_sum += ce_rows[:, :k].sum(1) if all_labelled else (ce_rows[:, :k] * lab_ok).sum(1)
                side_a.accumulate("mlm", q[0], s, e, m_mlm)
                side_b.accumulate("mlm", q[1], s, e, m_mlm)
            _row_parallel(dev, k, 4, kl)
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
        mlm_a=_loss(mlm[0].clone(), ga_mlm, sa_mlm, a_tensors),
        mlm_b=_loss(mlm[1].clone(), gb_mlm, sb_mlm, b_tensors),
        loss_ab=_loss(kl_ab * weight_ab, gb_kd, sb_kd, b_tensors),
        loss_ba=_loss(kl_ba * weight_ba, ga_kd, sa_kd, a_tensors),
        kl_ab=kl_ab,
        kl_ba=kl_ba,
    )
