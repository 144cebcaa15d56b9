"""The fused bidirectional KL (and its LM-head variant) against the reference definition.

Reference: ``ctcd_ds.losses.reference.kd_loss`` (two ``F.kl_div``) on the valid rows, and for the LM-head
variant ``hidden @ W.T + b`` -> ``F.cross_entropy`` + ``kd_loss``. All on tiny shapes (CPU, seconds).
The Triton kernel's tests need a CUDA device, except those running both of its paths in Triton's CPU
interpreter (child processes; skipped when triton is not installed).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctcd_ds.losses import (
    BidirectionalKL,
    LinearBidirectionalKL,
    bidirectional_kl,
    cpu_pool,
    fused,
    fused_linear,
    fused_linear_bidirectional_kl,
    kd_loss,
    triton_kd,
)

from conftest import REPO

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")
needs_triton = pytest.mark.skipif(
    not (HAS_CUDA and triton_kd.TRITON_AVAILABLE),
    reason=f"needs a CUDA device and triton (here: CUDA {HAS_CUDA}, triton {triton_kd.TRITON_AVAILABLE})",
)
FP32 = {"rtol": 1e-5, "atol": 1e-5}


def _grad(t: torch.Tensor) -> torch.Tensor:
    """A leaf's gradient, None read as zeros."""
    return t.grad if t.grad is not None else torch.zeros_like(t)


def _logits(n, v, scale=3.0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(n, v, generator=g) * scale).to(dtype).requires_grad_()
    b = (torch.randn(n, v, generator=g) * scale).to(dtype).requires_grad_()
    return a, b


def _reference(a, b, tau, w_ab, w_ba, mask=None):
    """(loss_ab, loss_ba, grad_a, grad_b) from the reference on fresh copies of the inputs."""
    ra, rb = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    sa, sb = (ra, rb) if mask is None else (ra[mask], rb[mask])
    loss_ab = w_ab * kd_loss(sa, sb, tau)
    loss_ba = w_ba * kd_loss(sb, sa, tau)
    loss_ab.backward()
    loss_ba.backward()
    return loss_ab.detach(), loss_ba.detach(), _grad(ra), _grad(rb)


def _fused_backward(a, b, *args, **kwargs) -> BidirectionalKL:
    a.grad = b.grad = None
    out = bidirectional_kl(a, b, *args, **kwargs)
    for loss in (out.loss_ab, out.loss_ba):
        if loss.requires_grad:
            loss.backward()
    return out


# --------------------------------------------------------------------------------------------------
# bidirectional_kl: values and gradients
# --------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(0, 12),
    v=st.integers(1, 40),
    tau=st.floats(0.5, 4.0),
    w_ab=st.sampled_from([1.0, 0.0, 0.3, 2.5, -0.7]),
    w_ba=st.sampled_from([1.0, 0.0, 0.6, 4.0]),
    scale=st.sampled_from([0.1, 1.0, 3.0, 8.0]),
    masked=st.booleans(),
    chunk=st.sampled_from([None, 1, 2, 5]),
    seed=st.integers(0, 2**16),
)
def test_matches_reference_fp32(n, v, tau, w_ab, w_ba, scale, masked, chunk, seed):
    a, b = _logits(n, v, scale, seed=seed)
    mask = (torch.rand(n, generator=torch.Generator().manual_seed(seed + 1)) > 0.4) if masked else None
    out = _fused_backward(a, b, tau, w_ab, w_ba, row_mask=mask, chunk_rows=chunk, backend="torch")
    ref_ab, ref_ba, ref_ga, ref_gb = _reference(a, b, tau, w_ab, w_ba, mask)
    torch.testing.assert_close(out.loss_ab, ref_ab, **FP32)
    torch.testing.assert_close(out.loss_ba, ref_ba, **FP32)
    if w_ab != 0:
        torch.testing.assert_close(out.kl_ab, ref_ab / w_ab, **FP32)
    if w_ba != 0:
        torch.testing.assert_close(out.kl_ba, ref_ba / w_ba, **FP32)
    torch.testing.assert_close(_grad(a), ref_ga, **FP32)
    torch.testing.assert_close(_grad(b), ref_gb, **FP32)
    for t in out:
        assert torch.isfinite(t).all()
    assert not out.kl_ab.requires_grad and not out.kl_ba.requires_grad


def test_larger_vocab_matches_reference():
    a, b = _logits(33, 3001, 4.0, seed=3)
    mask = torch.arange(33) % 4 != 1
    out = _fused_backward(a, b, 2.0, 0.8, 1.7, row_mask=mask, chunk_rows=7, backend="torch")
    ref_ab, ref_ba, ref_ga, ref_gb = _reference(a, b, 2.0, 0.8, 1.7, mask)
    torch.testing.assert_close(out.loss_ab, ref_ab, **FP32)
    torch.testing.assert_close(out.loss_ba, ref_ba, **FP32)
    torch.testing.assert_close(a.grad, ref_ga, **FP32)
    torch.testing.assert_close(b.grad, ref_gb, **FP32)
    assert (a.grad[~mask] == 0).all() and (b.grad[~mask] == 0).all()


@pytest.mark.parametrize("source_needs_grad", [True, False])
def test_one_way_edge_matches_reference(source_needs_grad):
    """weight_ba=0: an edge a -> b alone. loss_ab and b's gradient are the reference's; a gets no gradient."""
    a, b = _logits(17, 151, 3.0, seed=19)
    a.requires_grad_(source_needs_grad)
    ref = kd_loss(a.detach(), rb := b.detach().clone().requires_grad_(), 1.5)
    ref.backward()
    out = bidirectional_kl(a, b, 1.5, weight_ab=1.0, weight_ba=0.0)
    torch.testing.assert_close(out.loss_ab, ref.detach(), **FP32)
    torch.testing.assert_close(out.kl_ab, ref.detach(), **FP32)
    torch.testing.assert_close(out.kl_ba, kd_loss(b.detach(), a.detach(), 1.5), **FP32)  # still logged
    assert out.loss_ba.item() == 0.0
    out.loss_ab.backward()
    if out.loss_ba.requires_grad:
        assert out.loss_ba.grad_fn.saved_tensors == ()  # no gradient buffer was even allocated for a
        out.loss_ba.backward()
    assert a.grad is None
    torch.testing.assert_close(b.grad, rb.grad, **FP32)


@pytest.mark.parametrize("tau", [0.25, 0.5, 1.0, 2.0, 4.0, 10.0])
def test_temperatures_match_reference(tau):
    """Values (tau^2 * KL) and gradients (tau * (p_target - p_source) / N) at temperatures below and above 1."""
    a, b = _logits(19, 211, 3.0, seed=20)
    out = _fused_backward(a, b, tau)
    ref_ab, ref_ba, ref_ga, ref_gb = _reference(a, b, tau, 1.0, 1.0)
    torch.testing.assert_close(out.loss_ab, ref_ab, **FP32)
    torch.testing.assert_close(out.loss_ba, ref_ba, **FP32)
    torch.testing.assert_close(a.grad, ref_ga, **FP32)
    torch.testing.assert_close(b.grad, ref_gb, **FP32)


def test_directions_at_different_temperatures():
    """a -> b at tau 1 and b -> a at tau 4 can't share a pass: two one-way calls give the reference's losses
    and gradients."""
    a, b = _logits(13, 97, 3.0, seed=21)
    ab = bidirectional_kl(a, b, 1.0, weight_ab=1.0, weight_ba=0.0)
    ba = bidirectional_kl(a, b, 4.0, weight_ab=0.0, weight_ba=1.0)
    ab.loss_ab.backward()
    ba.loss_ba.backward()
    ra, rb = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ref_ab, ref_ba = kd_loss(ra, rb, 1.0), kd_loss(rb, ra, 4.0)
    (ref_ab + ref_ba).backward()
    torch.testing.assert_close(ab.loss_ab, ref_ab.detach(), **FP32)
    torch.testing.assert_close(ba.loss_ba, ref_ba.detach(), **FP32)
    torch.testing.assert_close(a.grad, ra.grad, **FP32)
    torch.testing.assert_close(b.grad, rb.grad, **FP32)


def test_weighted_pair_matches_reference():
    """weight_ab != weight_ba: each loss carries its own weight, each gradient reaches only its target, and
    the logged kl_* stay unweighted."""
    a, b = _logits(23, 157, 3.0, seed=22)
    w_ab, w_ba = 0.3, 2.5
    ra, rb = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ref_ab, ref_ba = kd_loss(ra, rb, 1.5), kd_loss(rb, ra, 1.5)
    (w_ab * ref_ab).backward()
    (w_ba * ref_ba).backward()
    out = bidirectional_kl(a, b, 1.5, weight_ab=w_ab, weight_ba=w_ba)
    torch.testing.assert_close(out.loss_ab, w_ab * ref_ab.detach(), **FP32)
    torch.testing.assert_close(out.loss_ba, w_ba * ref_ba.detach(), **FP32)
    torch.testing.assert_close(out.kl_ab, ref_ab.detach(), **FP32)
    torch.testing.assert_close(out.kl_ba, ref_ba.detach(), **FP32)
    out.loss_ab.backward()
    assert a.grad is None
    torch.testing.assert_close(b.grad, rb.grad, **FP32)
    gb = b.grad.clone()
    out.loss_ba.backward()
    torch.testing.assert_close(a.grad, ra.grad, **FP32)
    assert torch.equal(b.grad, gb)


@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_float64(masked):
    a, b = _logits(5, 7, 2.0, dtype=torch.float64, seed=1)
    mask = torch.tensor([True, False, True, True, False]) if masked else None
    # the source side is detached by definition, so each loss is checked w.r.t. its target only
    ca, cb = a.detach(), b.detach()
    assert torch.autograd.gradcheck(lambda y: bidirectional_kl(ca, y, 1.7, 0.6, 1.9, row_mask=mask).loss_ab, (b,))
    assert torch.autograd.gradcheck(lambda x: bidirectional_kl(x, cb, 1.7, 0.6, 1.9, row_mask=mask).loss_ba, (a,))
    # the float64 values also equal the reference computed in float64
    la = torch.log_softmax(a.detach() / 1.7, -1)
    lb = torch.log_softmax(b.detach() / 1.7, -1)
    rows = slice(None) if mask is None else mask
    kl_ab = (la.exp() * (la - lb)).sum(-1)[rows].mean() * 1.7**2
    torch.testing.assert_close(bidirectional_kl(a, b, 1.7, row_mask=mask).kl_ab, kl_ab, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    """Math is float32 on the given low-precision logits, so values match the reference (which also upcasts)
    to float32 rounding; gradients are returned in the input dtype and match to within 2 ulps of it."""
    a, b = _logits(24, 257, 3.0, dtype=dtype, seed=4)
    mask = torch.arange(24) % 5 != 0
    out = _fused_backward(a, b, 2.0, 1.0, 0.5, row_mask=mask, chunk_rows=4, backend="torch")
    ref_ab, ref_ba, ref_ga, ref_gb = _reference(a, b, 2.0, 1.0, 0.5, mask)
    assert out.loss_ab.dtype == torch.float32 and a.grad.dtype == dtype
    torch.testing.assert_close(out.loss_ab, ref_ab, **FP32)
    torch.testing.assert_close(out.loss_ba, ref_ba, **FP32)
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    for got, ref in ((a.grad, ref_ga), (b.grad, ref_gb)):
        tol = 2 * ulp * ref.float().abs().max()
        assert (got.float() - ref.float()).abs().max() <= tol


def test_float16_tiny_gradients_survive_loss_scaling():
    """Gradients of ~1e-8 underflow in float16; with a DeepSpeed-style loss scale they must come out as the
    reference's (float32 gradient times the scale, cast to float16), within 2 float16 ulps."""
    a, b = _logits(4096, 16, 0.001, dtype=torch.float16, seed=5)
    out = bidirectional_kl(a, b, 2.0)
    (out.loss_ab * 65536.0).backward()
    rb = b.detach().clone().requires_grad_()
    (kd_loss(a.detach(), rb, 2.0) * 65536.0).backward()
    unscaled = rb.grad.float() / 65536.0
    assert (unscaled.half() == 0).float().mean() > 0.5  # stored unscaled in float16, most would be lost
    assert (rb.grad != 0).float().mean() > 0.99
    assert (b.grad.float() - rb.grad.float()).abs().max() <= 2 * 2.0**-11 * rb.grad.float().abs().max()


# --------------------------------------------------------------------------------------------------
# bidirectional_kl: edge cases and the autograd contract
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["all_masked", "no_rows"])
def test_zero_valid_rows(case):
    n = 0 if case == "no_rows" else 6
    a, b = _logits(n, 11)
    mask = torch.zeros(n, dtype=torch.bool) if case == "all_masked" else None
    out = _fused_backward(a, b, 2.0, row_mask=mask)
    for t in out:
        assert t.item() == 0.0 and not torch.isnan(t)
    assert out.loss_ab.requires_grad and out.loss_ba.requires_grad
    for t in (a, b):
        assert t.grad is not None and t.grad.shape == t.shape and (t.grad == 0).all()


@pytest.mark.parametrize("order", ["ab_first", "ba_first"])
def test_losses_backward_independently(order):
    """Each loss reaches only its target; two backward calls, either order, no retain_graph."""
    a, b = _logits(9, 23, seed=6)
    _, _, ref_ga, ref_gb = _reference(a, b, 2.0, 0.4, 1.5)
    out = bidirectional_kl(a, b, 2.0, 0.4, 1.5)
    first, second = (out.loss_ab, out.loss_ba) if order == "ab_first" else (out.loss_ba, out.loss_ab)
    first.backward()
    if order == "ab_first":
        assert a.grad is None and b.grad is not None
    else:
        assert b.grad is None and a.grad is not None
    second.backward()
    torch.testing.assert_close(a.grad, ref_ga, **FP32)
    torch.testing.assert_close(b.grad, ref_gb, **FP32)


def test_grad_output_scaling_and_retained_graph():
    a, b = _logits(8, 19, seed=7)
    _, _, ref_ga, ref_gb = _reference(a, b, 1.5, 1.0, 1.0)
    out = bidirectional_kl(a, b, 1.5)
    (1024.0 * out.loss_ab).backward(retain_graph=True)
    torch.testing.assert_close(b.grad, 1024.0 * ref_gb, **FP32)
    b.grad = None
    (0.25 * out.loss_ab).backward(retain_graph=True)  # the retained graph rescales its buffer
    torch.testing.assert_close(b.grad, 0.25 * ref_gb, **FP32)
    b.grad = None
    (0.0 * out.loss_ab).backward(retain_graph=True)
    assert (b.grad == 0).all()
    b.grad = None
    out.loss_ab.backward()
    torch.testing.assert_close(b.grad, ref_gb, **FP32)
    with pytest.raises(RuntimeError):  # the graph is released, as for any loss without retain_graph
        out.loss_ab.backward()
    # accumulation on top of an existing .grad (gradient accumulation)
    (out.loss_ba / 4).backward()
    out2 = bidirectional_kl(a, b, 1.5)
    (out2.loss_ba / 4).backward()
    torch.testing.assert_close(a.grad, ref_ga / 2, **FP32)


def test_leaf_adopts_the_stored_buffer():
    """No second gradient-sized tensor: a leaf's .grad is the buffer computed in the forward (rescaled in
    place by grad_output)."""
    a, b = _logits(6, 13, seed=8)
    _, _, ref_ga, _ = _reference(a, b, 2.0, 1.0, 1.0)
    out = bidirectional_kl(a, b, 2.0)
    (buf,) = out.loss_ba.grad_fn.saved_tensors  # the gradient buffer for logits_a, filled in the forward
    buf_ptr = buf.data_ptr()
    del buf  # a reference held here would make autograd copy the gradient instead of adopting it
    (3.0 * out.loss_ba).backward()
    assert a.grad.data_ptr() == buf_ptr
    torch.testing.assert_close(a.grad, 3.0 * ref_ga, **FP32)


def test_chunk_size_does_not_change_results():
    a, b = _logits(29, 97, seed=9)
    mask = torch.arange(29) % 3 != 0
    results = []
    for chunk in (1, 4, 29, 1000, None):
        for m in (None, mask):
            out = _fused_backward(a, b, 1.3, 0.7, 1.1, row_mask=m, chunk_rows=chunk, backend="torch")
            results.append((m is None, out, a.grad.clone(), b.grad.clone()))
    for full in (True, False):
        group = [r for r in results if r[0] == full]
        for _, out, ga, gb in group[1:]:
            torch.testing.assert_close(out.loss_ab, group[0][1].loss_ab, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(out.loss_ba, group[0][1].loss_ba, rtol=1e-6, atol=1e-7)
            assert torch.equal(ga, group[0][2]) and torch.equal(gb, group[0][3])


def test_skipped_gradients():
    a, b = _logits(5, 9, seed=10)
    b.requires_grad_(False)
    out = bidirectional_kl(a, b, 2.0, weight_ab=1.0, weight_ba=0.0)
    assert not out.loss_ab.requires_grad  # logits_b needs no grad: a plain tensor
    assert out.loss_ba.requires_grad and out.loss_ba.item() == 0.0  # zero weight: no gradient computed
    out.loss_ba.backward()
    assert a.grad is None
    assert out.kl_ba.item() > 0
    with torch.no_grad():
        out = bidirectional_kl(a, b, 2.0)
    assert not out.loss_ab.requires_grad and not out.loss_ba.requires_grad


def _spy_row_parallel(monkeypatch, module) -> list[tuple[str, int, int, int]]:
    """Record (thread name, start, end, torch threads inside) of every row range ``module`` hands to
    :func:`cpu_pool.row_parallel`.

    When a call is split, its first range (start 0) and its last (end n) wait for each other at a barrier,
    so they must run at the same time on two different threads (a pool reusing one idle thread for every
    range, or running them one after another, times out instead)."""
    calls = []
    lock = threading.Lock()
    real = cpu_pool.row_parallel

    def spy(device, n, min_rows, fn):
        meet = threading.Barrier(2, timeout=5)

        def recorded(r0, r1):
            with lock:
                calls.append((threading.current_thread().name, r0, r1, torch.get_num_threads()))
            if (r0 == 0) != (r1 == n):  # the first or the last of several ranges
                meet.wait()
            fn(r0, r1)

        real(device, n, min_rows, recorded)

    monkeypatch.setattr(module, "row_parallel", spy)
    return calls


@pytest.fixture
def restore_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _tiles(ranges: list[tuple[int, int]], n: int) -> bool:
    """Whether the ranges are disjoint and cover [0, n) exactly."""
    ends = sorted(ranges)
    return ends[0][0] == 0 and ends[-1][1] == n and all(p[1] == q[0] for p, q in itertools.pairwise(ends))


@pytest.mark.parametrize("threads", [2, 3])
def test_cpu_worker_threads_match_one_thread(threads, monkeypatch, restore_torch_threads):
    """With several torch threads the rows are split over the worker pool (each worker single-threaded);
    the results equal those of a one-thread run, and torch's thread count is left as it was."""
    a, b = _logits(64, 33, seed=18)
    mask = torch.arange(64) % 5 != 0  # 51 valid rows
    tensors, labels = _head_inputs(n=40, seed=18)
    kl_calls = _spy_row_parallel(monkeypatch, fused)
    head_calls = _spy_row_parallel(monkeypatch, fused_linear)

    def run():
        """(results, row ranges of each bidirectional_kl call, row ranges of the head variant)."""
        results, kl_ranges = [], []
        for m in (None, mask):
            kl_calls.clear()
            out = _fused_backward(a, b, 1.7, 0.8, 1.3, row_mask=m, chunk_rows=4, backend="torch")
            results.append([*out, a.grad.clone(), b.grad.clone()])
            kl_ranges.append(list(kl_calls))
        head_calls.clear()
        head = fused_linear_bidirectional_kl(*tensors, labels, 2.0, 0.7, 1.4, chunk_rows=16, backend="torch")
        results.append([*head[:4], *_grads(head.mlm_a + head.loss_ba, tensors)[:3]])
        results.append(_grads(head.mlm_b + head.loss_ab, tensors)[3:])
        return results, kl_ranges, list(head_calls)

    torch.set_num_threads(1)
    single, kl_ranges, head_ranges = run()
    me = threading.current_thread().name
    assert [[c[:3] for c in r] for r in kl_ranges] == [[(me, 0, 64)], [(me, 0, 51)]]  # one range, this thread
    assert head_ranges and all(c[0] == me for c in head_ranges)

    torch.set_num_threads(threads)
    parallel, kl_ranges, head_ranges = run()
    assert torch.get_num_threads() == threads
    for calls, n in zip(kl_ranges, (64, 51)):
        assert len(calls) == threads and _tiles([c[1:3] for c in calls], n), calls
    for calls in (*kl_ranges, head_ranges):
        assert all(c[0].startswith(cpu_pool.THREAD_NAME_PREFIX) for c in calls), calls  # on pool workers,
        assert all(c[3] == 1 for c in calls), calls  # each running single-threaded torch ops
        assert len({c[0] for c in calls}) >= 2, calls  # really several of them
    # head variant, chunks of 16 + 16 + 8 rows: each phase split over min(threads, rows // 4) workers
    assert len(head_ranges) == 2 * (threads + threads + 2)

    for one, many in zip(single[:2], parallel[:2]):  # bidirectional_kl: row-wise math, bit-identical
        for x, y in zip(one, many):
            assert torch.equal(x, y)
    for one, many in zip(single[2:], parallel[2:]):  # the head variant's GEMMs use `threads` intra-op threads
        for x, y in zip(one, many):
            if x is not None:
                torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-7)


def test_bad_arguments():
    a, b = _logits(3, 5)
    with pytest.raises(ValueError):
        bidirectional_kl(a, b[:, :4], 2.0)
    with pytest.raises(ValueError):
        bidirectional_kl(a, b, 0.0)
    with pytest.raises(ValueError):
        bidirectional_kl(a, b, 2.0, row_mask=torch.ones(3))
    with pytest.raises(ValueError):
        bidirectional_kl(a, b, 2.0, backend="cuda")
    with pytest.raises(ValueError):
        bidirectional_kl(a, b, 2.0, chunk_rows=0)


def test_triton_module_imports_without_triton():
    assert isinstance(triton_kd.TRITON_AVAILABLE, bool)
    if not triton_kd.TRITON_AVAILABLE:
        a, b = _logits(3, 5)
        with pytest.raises(RuntimeError, match="triton"):
            bidirectional_kl(a, b, 2.0, backend="triton")


# --------------------------------------------------------------------------------------------------
# fused_linear_bidirectional_kl
# --------------------------------------------------------------------------------------------------


def _head_inputs(n=21, v=53, h_a=12, h_b=8, bias=True, dtype=torch.float32, seed=11, unlabelled=3):
    g = torch.Generator().manual_seed(seed)

    def mk(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(dtype).requires_grad_()

    tensors = []
    for h in (h_a, h_b):
        tensors += [mk(n, h), mk(v, h, s=0.5), mk(v) if bias else None]
    labels = torch.randint(0, v, (n,), generator=g)
    if unlabelled:
        labels[::unlabelled] = -100
    return tensors, labels


def _head_reference(tensors, labels, tau, w_ab, w_ba):
    """The four terms from materialised logits and the reference losses."""
    ha, wa, ba, hb, wb, bb = tensors
    za = F.linear(ha, wa, ba)
    zb = F.linear(hb, wb, bb)
    return {
        "mlm_a": F.cross_entropy(za.float(), labels, ignore_index=-100),
        "mlm_b": F.cross_entropy(zb.float(), labels, ignore_index=-100),
        "loss_ab": w_ab * kd_loss(za, zb, tau),
        "loss_ba": w_ba * kd_loss(zb, za, tau),
    }


def _grads(loss, tensors):
    live = [t for t in tensors if t is not None]
    gs = iter(torch.autograd.grad(loss, live, allow_unused=True, retain_graph=True))
    return [None if t is None else next(gs) for t in tensors]


@pytest.mark.parametrize(
    "tau,w_ab,w_ba,bias,chunk,unlabelled",
    [
        (2.0, 1.0, 1.0, True, 4, 3),
        (1.0, 0.5, 2.0, False, None, 0),
        (0.7, 1.3, 0.0, True, 1, 2),
        (3.0, 0.0, 1.0, False, 7, 4),
    ],
)
def test_linear_variant_matches_reference(tau, w_ab, w_ba, bias, chunk, unlabelled):
    tensors, labels = _head_inputs(bias=bias, unlabelled=unlabelled)
    ref = _head_reference(tensors, labels, tau, w_ab, w_ba)
    out = fused_linear_bidirectional_kl(*tensors, labels, tau, w_ab, w_ba, chunk_rows=chunk, backend="torch")
    assert isinstance(out, LinearBidirectionalKL)
    a_side, b_side = {0, 1, 2}, {3, 4, 5}
    for name, reaches in (("mlm_a", a_side), ("mlm_b", b_side), ("loss_ab", b_side), ("loss_ba", a_side)):
        got = getattr(out, name)
        torch.testing.assert_close(got, ref[name].detach(), **FP32)
        scale = 3.5  # an arbitrary grad_output
        g_fused = _grads(scale * got, tensors)
        g_ref = _grads(scale * ref[name], tensors)
        for i, (gf, gr) in enumerate(zip(g_fused, g_ref)):
            if tensors[i] is None:
                continue
            if i not in reaches:
                assert gf is None, f"{name} reached tensor {i} of the other model"
            gf = gf if gf is not None else torch.zeros_like(tensors[i])
            gr = gr if gr is not None else torch.zeros_like(tensors[i])
            torch.testing.assert_close(gf, gr, **FP32, msg=lambda m, name=name, i=i: f"{name}, tensor {i}: {m}")
    za, zb = (F.linear(*tensors[i : i + 3]) for i in (0, 3))
    torch.testing.assert_close(out.kl_ab, kd_loss(za, zb, tau).detach(), **FP32)


def test_linear_variant_each_model_backpropagates_its_total():
    """Engine a: backward(mlm_a + loss_ba); engine b: backward(mlm_b + loss_ab); no retain_graph; all six grads."""
    tensors, labels = _head_inputs(seed=12)
    ref = _head_reference(tensors, labels, 2.0, 0.7, 1.4)
    ref_grads = _grads(ref["mlm_a"] + ref["loss_ba"], tensors)[:3] + _grads(ref["mlm_b"] + ref["loss_ab"], tensors)[3:]
    out = fused_linear_bidirectional_kl(*tensors, labels, 2.0, 0.7, 1.4)
    (out.mlm_b + out.loss_ab).backward()
    assert all(t.grad is None for t in tensors[:3])
    ((out.mlm_a + out.loss_ba) * 8.0).backward()  # e.g. a loss scale
    for i, (t, g) in enumerate(zip(tensors, ref_grads)):
        torch.testing.assert_close(t.grad, g * (8.0 if i < 3 else 1.0), **FP32)


def test_linear_variant_no_labelled_rows_and_bf16():
    tensors, labels = _head_inputs(n=6, unlabelled=1)  # every row is -100
    out = fused_linear_bidirectional_kl(*tensors, labels, 2.0)
    assert out.mlm_a.item() == 0.0 and out.mlm_b.item() == 0.0
    (out.mlm_a + out.loss_ba).backward()
    assert all(torch.isfinite(t.grad).all() for t in tensors[:3])

    tensors, labels = _head_inputs(dtype=torch.bfloat16, seed=13)
    ref = _head_reference(tensors, labels, 2.0, 1.0, 1.0)
    out = fused_linear_bidirectional_kl(*tensors, labels, 2.0, chunk_rows=5)
    for name in ("mlm_a", "mlm_b", "loss_ab", "loss_ba"):
        torch.testing.assert_close(getattr(out, name), ref[name].detach().float(), rtol=1e-3, atol=1e-3)
    for gf, gr in zip(_grads(out.mlm_a + out.loss_ba, tensors), _grads(ref["mlm_a"] + ref["loss_ba"], tensors)):
        if gr is not None:  # bf16: within ~2% of the largest entry (summation order differs from one GEMM)
            assert gf.dtype == torch.bfloat16
            assert (gf.float() - gr.float()).abs().max() <= 0.02 * gr.float().abs().max()


def test_linear_variant_gradcheck_float64():
    tensors, labels = _head_inputs(n=5, v=7, h_a=3, h_b=2, dtype=torch.float64, seed=14, unlabelled=2)
    fixed = [t.detach() for t in tensors]
    # each term w.r.t. its own model's tensors, the other model's held fixed (its side is detached)
    for pick, own in ((0, 0), (1, 3), (2, 3), (3, 0)):

        def fn(h, w, b, pick=pick, own=own):
            ts = list(fixed)
            ts[own : own + 3] = [h, w, b]
            return fused_linear_bidirectional_kl(*ts, labels, 1.6, 0.8, 1.2, chunk_rows=2)[pick]

        assert torch.autograd.gradcheck(fn, tuple(tensors[own : own + 3]), fast_mode=True)


# --------------------------------------------------------------------------------------------------
# CUDA / Triton (skipped without a GPU; benchmarks/gpu_check.sh runs them on one)
# --------------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_reference(backend, dtype):
    if backend == "auto" and not triton_kd.TRITON_AVAILABLE:
        pytest.skip("triton not installed: 'auto' is the torch path")
    a, b = _logits(67, 5003, 3.0, dtype=dtype, seed=15)
    a, b = a.detach().cuda().requires_grad_(), b.detach().cuda().requires_grad_()
    mask = (torch.arange(67) % 6 != 2).cuda()
    out = _fused_backward(a, b, 2.0, 0.6, 1.4, row_mask=mask, backend=backend)
    ref_ab, ref_ba, ref_ga, ref_gb = _reference(a, b, 2.0, 0.6, 1.4, mask)
    tol = FP32 if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-4}
    torch.testing.assert_close(out.loss_ab, ref_ab, **FP32)
    torch.testing.assert_close(out.loss_ba, ref_ba, **FP32)
    torch.testing.assert_close(a.grad.float(), ref_ga.float(), **tol)
    torch.testing.assert_close(b.grad.float(), ref_gb.float(), **tol)


@needs_triton
@pytest.mark.parametrize("launch", triton_kd.TUNING_GRID, ids=lambda c: triton_kd.launch_name(**c))
def test_triton_kernel_matches_torch_path(launch):
    """Every two-pass launch setting the benchmark may pick; 30522 columns = a partial last block for each
    block size."""
    a, b = _logits(129 if launch["programs_per_sm"] is None else 1031, 30522, 4.0, seed=16)
    a, b = a.detach().cuda().requires_grad_(), b.detach().cuda().requires_grad_()
    for mask in (None, (torch.arange(a.shape[0]) % 3 != 0).cuda()):
        with triton_kd.launch_settings(**launch), triton_kd.kernel_path("two_pass"):
            t = _fused_backward(a, b, 2.0, 0.5, 1.5, row_mask=mask, backend="triton")
        ga, gb = a.grad.clone(), b.grad.clone()
        r = _fused_backward(a, b, 2.0, 0.5, 1.5, row_mask=mask, backend="torch")
        torch.testing.assert_close(t.loss_ab, r.loss_ab, **FP32)
        torch.testing.assert_close(t.loss_ba, r.loss_ba, **FP32)
        torch.testing.assert_close(ga, a.grad, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(gb, b.grad, rtol=1e-5, atol=1e-8)


@needs_triton
@pytest.mark.parametrize("programs_per_sm", [None, 4])
@pytest.mark.parametrize("v", [5003, triton_kd.ONE_PASS_MAX_BLOCK, 30522])
@pytest.mark.parametrize("path", ["one_pass", "two_pass"])
def test_triton_paths_match_torch_path(path, v, programs_per_sm):
    """Both paths, forced, at a masked partial block, at the widest row "auto" sends through one pass, and at
    BERT's vocabulary (forced one pass: a 32768-wide block, as the benchmark times it)."""
    a, b = _logits(1031 if programs_per_sm else 129, v, 4.0, seed=23)
    a, b = a.detach().cuda().requires_grad_(), b.detach().cuda().requires_grad_()
    for mask in (None, (torch.arange(a.shape[0]) % 3 != 0).cuda()):
        with triton_kd.launch_settings(triton_kd.BLOCK_V, triton_kd.NUM_WARPS, programs_per_sm):
            with triton_kd.kernel_path(path):
                t = _fused_backward(a, b, 2.0, 0.5, 1.5, row_mask=mask, backend="triton")
        ga, gb = a.grad.clone(), b.grad.clone()
        r = _fused_backward(a, b, 2.0, 0.5, 1.5, row_mask=mask, backend="torch")
        torch.testing.assert_close(t.loss_ab, r.loss_ab, **FP32)
        torch.testing.assert_close(t.loss_ba, r.loss_ba, **FP32)
        for got, want in ((ga, a.grad), (gb, b.grad)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


@needs_triton
def test_triton_linear_variant_matches_reference():
    tensors, labels = _head_inputs(n=40, v=3001, h_a=64, h_b=32, seed=17)
    tensors = [t.detach().cuda().requires_grad_() if t is not None else None for t in tensors]
    labels = labels.cuda()
    ref = _head_reference(tensors, labels, 2.0, 1.0, 1.0)
    out = fused_linear_bidirectional_kl(*tensors, labels, 2.0, backend="triton")
    for name in ("mlm_a", "mlm_b", "loss_ab", "loss_ba"):
        torch.testing.assert_close(getattr(out, name), ref[name].detach(), rtol=1e-4, atol=1e-5)
    for gf, gr in zip(_grads(out.mlm_a + out.loss_ba, tensors)[:3], _grads(ref["mlm_a"] + ref["loss_ba"], tensors)[:3]):
        torch.testing.assert_close(gf, gr, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# The Triton kernel in Triton's CPU interpreter (both paths; skipped without triton)
# --------------------------------------------------------------------------------------------------

INTERPRETER_SHAPES = ((5, 7), (12, 100), (33, 1000), (9, triton_kd.BLOCK_V + 1))
"""(N, V) for the interpreter: tiny, mid-sized, and just over one two-pass block (a partial second block)."""
WIDE_SHAPE = (3, triton_kd.ONE_PASS_MAX_BLOCK + 1)
"""Just over the widest row "auto" sends through one pass (forced there: a 32768-wide block, 1 column used of
its second half)."""


def _interpreter_cases() -> list[dict]:
    """Keyword arguments of :func:`_check_kernel_case`: the variations the CUDA tests cover."""
    cases = [{"n": n, "v": v, "dtype": dt} for n, v in INTERPRETER_SHAPES for dt in (torch.bfloat16, torch.float16)]
    cases += [{"n": n, "v": v, "masked": m} for n, v in INTERPRETER_SHAPES for m in (False, True)]
    cases.append({"n": WIDE_SHAPE[0], "v": WIDE_SHAPE[1]})
    cases += [{"n": n, "v": v, "programs_per_sm": 2} for n, v in INTERPRETER_SHAPES]  # 2 programs loop over rows
    cases += [{"n": 12, "v": 100, "tau": tau} for tau in (0.25, 1.0, 4.0, 10.0)]
    cases += [{"n": 12, "v": 100, "w_ab": w_ab, "w_ba": w_ba} for w_ab, w_ba in ((1.0, 0.0), (0.0, 1.0), (-0.7, 2.5))]
    return cases


def _check_kernel_case(n, v, dtype=torch.float32, tau=2.0, w_ab=0.6, w_ba=1.4, masked=True, programs_per_sm=None):
    """``bidirectional_kl`` through the kernel (on the current :data:`triton_kd.KERNEL_PATH`) against the
    reference: both losses, and both gradients (float32: also against the torch path, to 1e-6 of the largest
    entry; bfloat16 and float16: within 2 ulps of the input dtype, as :func:`test_low_precision_inputs`)."""
    a, b = _logits(n, v, 3.0, dtype=dtype, seed=n * v)
    mask = torch.arange(n) % 4 != 1 if masked else None
    with triton_kd.launch_settings(triton_kd.BLOCK_V, triton_kd.NUM_WARPS, programs_per_sm):
        out = _fused_backward(a, b, tau, w_ab, w_ba, row_mask=mask, backend="triton")
    ga, gb = _grad(a), _grad(b)
    ref_ab, ref_ba, ref_ga, ref_gb = _reference(a, b, tau, w_ab, w_ba, mask)
    torch.testing.assert_close(out.loss_ab, ref_ab, **FP32)
    torch.testing.assert_close(out.loss_ba, ref_ba, **FP32)
    if mask is not None:
        assert (ga[~mask] == 0).all() and (gb[~mask] == 0).all()
    if dtype == torch.float32:
        torch.testing.assert_close(ga, ref_ga, **FP32)
        torch.testing.assert_close(gb, ref_gb, **FP32)
        r = _fused_backward(a, b, tau, w_ab, w_ba, row_mask=mask, backend="torch")
        torch.testing.assert_close(out.kl_ab, r.kl_ab, **FP32)
        torch.testing.assert_close(out.kl_ba, r.kl_ba, **FP32)
        for got, want in ((ga, _grad(a)), (gb, _grad(b))):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())
    else:
        ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
        for got, ref in ((ga, ref_ga), (gb, ref_gb)):
            err, tol = (got.float() - ref.float()).abs().max().item(), 2 * ulp * ref.float().abs().max().item()
            assert got.dtype == dtype and err <= tol, f"{got.dtype} gradient off by {err:.3g} > {tol:.3g}"


def _interpreter_main(path: str) -> None:
    """(Child process, ``TRITON_INTERPRET=1``.) Every case of :func:`_interpreter_cases` on ``path``."""
    kernel = triton_kd._bidirectional_kl_kernel
    assert type(kernel).__name__ == "InterpretedFunction", f"not the interpreter: {type(kernel)}"
    fused.use_triton = lambda backend, *tensors: backend == "triton"  # admits CPU tensors (the interpreter's)
    cases = _interpreter_cases()
    with triton_kd.kernel_path(path):
        for case in cases:
            assert triton_kd.resolve_path(case["v"]) == path
            try:
                _check_kernel_case(**case)
            except AssertionError as e:
                raise AssertionError(f"{path}, {case}: {e}") from e
    print(f"{path}: {len(cases)} cases passed")


@pytest.mark.skipif(not triton_kd.TRITON_AVAILABLE, reason="triton is not installed (the interpreter comes with it)")
@pytest.mark.parametrize("path", ["one_pass", "two_pass"])
def test_triton_interpreter_matches_reference(path):
    """Each kernel path in Triton's CPU interpreter on CPU tensors, through ``bidirectional_kl``. In a child
    process: ``TRITON_INTERPRET`` must be set before triton is imported, and this process imported it."""
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    cmd = [sys.executable, "-W", "ignore::RuntimeWarning", __file__, path]  # numpy warns on the masked inf - inf
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"{path}: {len(_interpreter_cases())} cases passed" in res.stdout


def test_kernel_path_dispatch():
    """Under "auto" rows up to ONE_PASS_MAX_BLOCK padded columns take one pass, wider ones two; either can be
    forced."""
    assert [triton_kd.padded_width(v) for v in (1, 2, 7, 8, 2049, 30522)] == [1, 2, 8, 8, 4096, 32768]
    widest = triton_kd.ONE_PASS_MAX_BLOCK
    assert [triton_kd.resolve_path(v) for v in (1, 7, widest, widest + 1, 30522)] == [
        "one_pass",
        "one_pass",
        "one_pass",
        "two_pass",
        "two_pass",
    ]
    for path in ("one_pass", "two_pass"):
        with triton_kd.kernel_path(path):
            assert {triton_kd.resolve_path(v) for v in (7, widest, widest + 1, 30522)} == {path}
    assert triton_kd.KERNEL_PATH == "auto"
    with pytest.raises(ValueError, match="three_pass"), triton_kd.kernel_path("three_pass"):
        pass


if __name__ == "__main__":
    _interpreter_main(sys.argv[1])
