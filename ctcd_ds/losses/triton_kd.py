"""Triton kernel for the fused bidirectional KL (CUDA), used by :mod:`ctcd_ds.losses.fused` on CUDA tensors.

UNTESTED: this kernel was written on a machine without a GPU and without Triton; it has never been
compiled or run. The torch path in ``fused.py`` is the tested one. The CUDA tests in
``tests/test_fused_kd.py`` (skipped without a GPU) compare this kernel with the reference; run them on a
GPU before relying on it, and use ``backend="torch"`` to bypass it.

One program per row: pass 1 streams both rows over V in blocks with an online softmax (running max and
sum for a and b, plus the running sums of ``exp(x_a - m_a) * (x_a - x_b)`` and ``exp(x_b - m_b) *
(x_a - x_b)``), which gives both log-sum-exps and both KL values; pass 2 streams V again and writes
``grad_a = (p_a - p_b) * ka`` and ``grad_b = (p_a - p_b) * kb``. Math in float32 for any input dtype.

Importing this module never fails: ``TRITON_AVAILABLE`` says whether the kernel can be used.
"""

from __future__ import annotations

try:  # guarded: triton is optional (absent on CPU-only machines)
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except Exception:  # ImportError, or a broken install
    triton = None
    tl = None
    TRITON_AVAILABLE = False

BLOCK_V = 2048
"""Columns per block of the loop over V."""


if TRITON_AVAILABLE:

    @triton.jit
    def _bidirectional_kl_kernel(
        za_ptr, zb_ptr, stride_za, stride_zb,
        rows_ptr,
        ga_ptr, gb_ptr, stride_ga, stride_gb,
        kl_ab_ptr, kl_ba_ptr,
        V, inv_tau, ka, kb,
        HAS_ROWS: tl.constexpr, HAS_GA: tl.constexpr, HAS_GB: tl.constexpr, BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        if HAS_ROWS:
            row = tl.load(rows_ptr + pid).to(tl.int64)
        else:
            row = pid.to(tl.int64)
        za_row = za_ptr + row * stride_za
        zb_row = zb_ptr + row * stride_zb
        cols = tl.arange(0, BLOCK)

        # pass 1: online softmax of both rows + the two KL numerators
        # 0-d float32 loop-carried accumulators
        m_a = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
        m_b = m_a
        s_a = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
        s_b = s_a
        t_a = s_a
        t_b = s_a
        for start in range(0, V, BLOCK):
            offs = start + cols
            mask = offs < V
            xa = tl.load(za_row + offs, mask=mask, other=-float("inf")).to(tl.float32) * inv_tau
            xb = tl.load(zb_row + offs, mask=mask, other=-float("inf")).to(tl.float32) * inv_tau
            dx = tl.where(mask, xa - xb, 0.0)
            new_a = tl.maximum(m_a, tl.max(xa, axis=0))
            new_b = tl.maximum(m_b, tl.max(xb, axis=0))
            ea = tl.exp(xa - new_a)  # 0 at masked columns
            eb = tl.exp(xb - new_b)
            ca = tl.exp(m_a - new_a)  # rescale of the running sums (0 on the first block)
            cb = tl.exp(m_b - new_b)
            s_a = s_a * ca + tl.sum(ea, axis=0)
            s_b = s_b * cb + tl.sum(eb, axis=0)
            t_a = t_a * ca + tl.sum(ea * dx, axis=0)
            t_b = t_b * cb + tl.sum(eb * dx, axis=0)
            m_a = new_a
            m_b = new_b
        lse_a = m_a + tl.log(s_a)
        lse_b = m_b + tl.log(s_b)
        shift = lse_a - lse_b
        tl.store(kl_ab_ptr + pid, t_a / s_a - shift)
        tl.store(kl_ba_ptr + pid, shift - t_b / s_b)

        # pass 2: gradients from p_a - p_b
        if HAS_GA or HAS_GB:
            for start in range(0, V, BLOCK):
                offs = start + cols
                mask = offs < V
                xa = tl.load(za_row + offs, mask=mask, other=0.0).to(tl.float32) * inv_tau
                xb = tl.load(zb_row + offs, mask=mask, other=0.0).to(tl.float32) * inv_tau
                diff = tl.exp(xa - lse_a) - tl.exp(xb - lse_b)
                if HAS_GA:
                    tl.store(ga_ptr + row * stride_ga + offs, (diff * ka).to(ga_ptr.dtype.element_ty), mask=mask)
                if HAS_GB:
                    tl.store(gb_ptr + row * stride_gb + offs, (diff * kb).to(gb_ptr.dtype.element_ty), mask=mask)


def bidirectional_kl_rows(za, zb, rows, inv_tau, ka, kb, grad_a, grad_b, kl_ab_rows, kl_ba_rows) -> None:
    """Same contract as ``fused._torch_rows``: for each row ``r`` of ``rows`` (LongTensor on the device, or
    None = every row), ``kl_*_rows[i]`` = the row's KL values and ``grad_x[r] = (p_a - p_b) * k_x`` for the
    gradients that are not None. ``za``, ``zb``: ``[N, V]`` CUDA tensors; ``kl_*_rows``: float32."""
    if not TRITON_AVAILABLE:
        raise RuntimeError("triton is not installed")
    if za.stride(1) != 1:
        za = za.contiguous()
    if zb.stride(1) != 1:
        zb = zb.contiguous()
    for g in (grad_a, grad_b):
        if g is not None and g.stride(1) != 1:
            raise ValueError("gradient buffers must have unit column stride")
    n = kl_ab_rows.numel()
    if n == 0:
        return
    vocab = za.shape[1]
    dummy = kl_ab_rows  # any device pointer for the arguments a specialisation never reads
    _bidirectional_kl_kernel[(n,)](
        za, zb, za.stride(0), zb.stride(0),
        rows if rows is not None else dummy,
        grad_a if grad_a is not None else dummy, grad_b if grad_b is not None else dummy,
        grad_a.stride(0) if grad_a is not None else 0, grad_b.stride(0) if grad_b is not None else 0,
        kl_ab_rows, kl_ba_rows,
        vocab, float(inv_tau), float(ka), float(kb),
        HAS_ROWS=rows is not None, HAS_GA=grad_a is not None, HAS_GB=grad_b is not None,
        BLOCK=min(BLOCK_V, triton.next_power_of_2(vocab)),
        num_warps=8,
    )


__all__ = ["TRITON_AVAILABLE", "BLOCK_V", "bidirectional_kl_rows"]
