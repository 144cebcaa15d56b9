"""Triton kernel for the fused bidirectional KL (CUDA), used by :mod:`ctcd_ds.losses.fused` on CUDA tensors.

GPU-only: the kernel needs a CUDA device and Triton; without them its tests are skipped
(``benchmarks/gpu_check.sh`` runs them on a GPU: against the reference in fp32/bf16/fp16, against the torch
path under every launch setting of :data:`TUNING_GRID`, and the LM-head variant). ``backend="torch"``
bypasses it. The kernel's logic also runs in Triton's CPU interpreter (``TRITON_INTERPRET=1``) on CPU tensors.

One program per row (or a persistent grid looping over rows, :data:`PROGRAMS_PER_SM`): pass 1 streams
both rows over V in blocks with an online softmax (running max and sum for a and b, plus the running sums
of ``exp(x_a - m_a) * (x_a - x_b)`` and ``exp(x_b - m_b) * (x_a - x_b)``), which gives both log-sum-exps
and both KL values; pass 2 streams V again and writes ``grad_a = (p_a - p_b) * ka`` and
``grad_b = (p_a - p_b) * kb``. Math in float32 for any input dtype.

Importing this module never fails: ``TRITON_AVAILABLE`` says whether the kernel can be used.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

try:  # guarded: triton is optional (absent on CPU-only machines)
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except Exception:  # noqa: BLE001 (ImportError, or a broken install: either way, no kernel)
    triton = None
    tl = None
    TRITON_AVAILABLE = False

BLOCK_V = 2048
"""Columns per block of the loop over V."""

NUM_WARPS = 8
"""Warps per program."""

PROGRAMS_PER_SM: int | None = None
"""None: one program per row. A number k: a persistent grid of k programs per multiprocessor, each looping
over rows, so that fewer rows are in flight and pass 2 re-reads them from L2 rather than from memory."""

TUNING_GRID = tuple(
    {"block": block, "warps": warps, "programs_per_sm": pps}
    for block, warps in ((2048, 8), (4096, 8), (4096, 16), (8192, 16))
    for pps in (None, 2, 4)
)
"""The launch settings the CUDA tests check and ``benchmarks/kd_loss.py --device cuda --sweep`` times; the
defaults above are one of them."""


def launch_name(block: int, warps: int, programs_per_sm: int | None) -> str:
    """A launch setting as ``b<block>-w<warps>-p<programs per SM>`` (test ids, benchmark rows)."""
    return f"b{block}-w{warps}-p{programs_per_sm}"


@contextmanager
def launch_settings(block: int, warps: int, programs_per_sm: int | None):
    """Use these launch settings inside the block (tests and benchmarks; not thread-safe)."""
    global BLOCK_V, NUM_WARPS, PROGRAMS_PER_SM
    saved = BLOCK_V, NUM_WARPS, PROGRAMS_PER_SM
    BLOCK_V, NUM_WARPS, PROGRAMS_PER_SM = block, warps, programs_per_sm
    try:
        yield
    finally:
        BLOCK_V, NUM_WARPS, PROGRAMS_PER_SM = saved


if TRITON_AVAILABLE:
    # the arguments grouped as the launch passes them
    # fmt: off
    @triton.jit
    def _bidirectional_kl_kernel(
        za_ptr, zb_ptr, stride_za, stride_zb,
        rows_ptr,
        ga_ptr, gb_ptr, stride_ga, stride_gb,
        kl_ab_ptr, kl_ba_ptr,
        n_rows, n_programs, rows_per_program, V, inv_tau, ka, kb,
        HAS_ROWS: tl.constexpr, HAS_GA: tl.constexpr, HAS_GB: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # fmt: on
        # program p handles rows p, p + P, p + 2P, ... (P = n_programs, the grid size: n_rows, or fewer when
        # persistent); the trip count comes from the host (the interpreter needs a plain range)
        for i in range(0, rows_per_program):
            pid = tl.program_id(0) + i * n_programs
            if pid < n_rows:
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

                # pass 2: gradients from p_a - p_b (re-reading the rows: from L2 when few rows are in flight)
                if HAS_GA or HAS_GB:
                    for start in range(0, V, BLOCK):
                        offs = start + cols
                        mask = offs < V
                        xa = tl.load(za_row + offs, mask=mask, other=0.0).to(tl.float32) * inv_tau
                        xb = tl.load(zb_row + offs, mask=mask, other=0.0).to(tl.float32) * inv_tau
                        diff = tl.exp(xa - lse_a) - tl.exp(xb - lse_b)
                        if HAS_GA:
                            tl.store(
                                ga_ptr + row * stride_ga + offs, (diff * ka).to(ga_ptr.dtype.element_ty), mask=mask
                            )
                        if HAS_GB:
                            tl.store(
                                gb_ptr + row * stride_gb + offs, (diff * kb).to(gb_ptr.dtype.element_ty), mask=mask
                            )


def bidirectional_kl_rows(za, zb, rows, inv_tau, ka, kb, grad_a, grad_b, kl_ab_rows, kl_ba_rows) -> None:
    """Same contract as ``ctcd_ds.losses.fused._torch_rows``: for each row ``r`` of ``rows`` (LongTensor on
    the device, or None = every row), ``kl_*_rows[i]`` = the row's KL values and ``grad_x[r] = (p_a - p_b) * k_x``
    for the gradients that are not None. ``za``, ``zb``: ``[N, V]`` CUDA tensors; ``kl_*_rows``: float32."""
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
    programs = n
    if PROGRAMS_PER_SM is not None:
        sms = torch.cuda.get_device_properties(za.device).multi_processor_count
        programs = min(n, sms * PROGRAMS_PER_SM)
    dummy = kl_ab_rows  # any device pointer for the arguments a specialisation never reads
    # fmt: off
    _bidirectional_kl_kernel[(programs,)](
        za, zb, za.stride(0), zb.stride(0),
        rows if rows is not None else dummy,
        grad_a if grad_a is not None else dummy, grad_b if grad_b is not None else dummy,
        grad_a.stride(0) if grad_a is not None else 0, grad_b.stride(0) if grad_b is not None else 0,
        kl_ab_rows, kl_ba_rows,
        n, programs, -(-n // programs), vocab, float(inv_tau), float(ka), float(kb),
        HAS_ROWS=rows is not None, HAS_GA=grad_a is not None, HAS_GB=grad_b is not None,
        BLOCK=min(BLOCK_V, triton.next_power_of_2(vocab)),
        num_warps=NUM_WARPS,
    )
    # fmt: on


__all__ = [
    "BLOCK_V",
    "NUM_WARPS",
    "PROGRAMS_PER_SM",
    "TRITON_AVAILABLE",
    "TUNING_GRID",
    "bidirectional_kl_rows",
    "launch_name",
    "launch_settings",
]
