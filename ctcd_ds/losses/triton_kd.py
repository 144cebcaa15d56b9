"""Triton kernel for the fused bidirectional KL (CUDA), used by :mod:`ctcd_ds.losses.fused` on CUDA tensors.

GPU-only in training: the kernel needs a CUDA device and Triton; without them its CUDA tests are skipped
(``benchmarks/gpu_check.sh`` runs them on a GPU: against the reference in fp32/bf16/fp16, against the torch
path under every launch setting of :data:`TUNING_GRID` and on both paths, and the LM-head variant).
``backend="torch"`` bypasses it. Both paths also run in Triton's CPU interpreter (``TRITON_INTERPRET=1``,
set before triton is imported) on CPU tensors; ``tests/test_fused_kd.py`` checks them there when triton is
installed.

Two paths, one program per row (or a persistent grid looping over rows, :data:`PROGRAMS_PER_SM`), picked
per call by :func:`resolve_path`:

- **one pass** (rows whose padded width, the next power of two of V, is at most :data:`ONE_PASS_MAX_BLOCK`):
  the program loads the whole row of both inputs once (one masked block of the padded width), computes
  both log-sum-exps, both KL values and ``p_a - p_b`` from registers and writes both gradients. Per call it
  reads ``2·N·V`` and writes ``2·N·V`` elements: the minimum, the bytes of a copy of both inputs.
- **two passes** (wider rows): pass 1 streams both rows over V in blocks of :data:`BLOCK_V` with an online
  softmax (running max and sum for a and b, plus the running sums of ``exp(x_a - m_a) * (x_a - x_b)`` and
  ``exp(x_b - m_b) * (x_a - x_b)``), which gives both log-sum-exps and both KL values; pass 2 streams V
  again and writes ``grad_a = (p_a - p_b) * ka`` and ``grad_b = (p_a - p_b) * kb``. It reads ``4·N·V``
  and writes ``2·N·V`` elements (at most 2/3 of copy bandwidth unless pass 2 hits L2).

Both compute the same quantities in float32 for any input dtype; :data:`KERNEL_PATH` (or
:func:`kernel_path`) forces either path.

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
"""Columns per block of the two-pass loop over V."""

NUM_WARPS = 8
"""Warps per program of the two-pass path."""

PROGRAMS_PER_SM: int | None = None
"""None: one program per row. A number k: a persistent grid of k programs per multiprocessor (one assumed
off CUDA, in the interpreter), each looping over rows; on the two-pass path fewer rows are then in flight,
so that pass 2 re-reads them from L2 rather than from memory. Applies to both paths."""

ONE_PASS_MAX_BLOCK = 16384
"""Under ``KERNEL_PATH = "auto"``, rows whose padded width (next power of two of V) is at most this take the
one-pass path, wider rows the two-pass one. At 16384 a program holds 2 x 16384 float32 inputs (128 KiB,
half the register file of an A100/H100 multiprocessor) plus temporaries; at 32768 the inputs alone would
fill it, so the row would spill to local memory. BERT's V = 30522 (padded 32768) therefore takes the
two-pass path by default; whether forcing one pass wins there is unmeasured."""

ONE_PASS_COLUMNS_PER_WARP = 1024
"""The one-pass program gets ``padded width / 1024`` warps (32 columns of each input per thread), clamped to
4..32: enough threads that a 16384-wide row fits in registers, few for narrow rows."""

KERNEL_PATHS = ("auto", "one_pass", "two_pass")
"""The values of :data:`KERNEL_PATH`."""

KERNEL_PATH = "auto"
"""``"auto"``: one pass up to :data:`ONE_PASS_MAX_BLOCK`, two passes above. ``"one_pass"`` / ``"two_pass"``:
that path at every width (tests, benchmarks; forced one pass on wide rows spills registers)."""

TUNING_GRID = tuple(
    {"block": block, "warps": warps, "programs_per_sm": pps}
    for block, warps in ((2048, 8), (4096, 8), (4096, 16), (8192, 16))
    for pps in (None, 2, 4)
)
"""The two-pass launch settings the CUDA tests check and ``benchmarks/kd_loss.py --device cuda --sweep``
times; the defaults above are one of them."""


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


@contextmanager
def kernel_path(path: str):
    """Use ``path`` (one of :data:`KERNEL_PATHS`) inside the block (tests and benchmarks; not thread-safe)."""
    global KERNEL_PATH
    if path not in KERNEL_PATHS:
        raise ValueError(f"path={path!r}: expected one of {KERNEL_PATHS}")
    saved = KERNEL_PATH
    KERNEL_PATH = path
    try:
        yield
    finally:
        KERNEL_PATH = saved


def padded_width(vocab: int) -> int:
    """The next power of two >= ``vocab`` (the one-pass block; 1 for ``vocab <= 1``)."""
    return 1 << max(vocab - 1, 0).bit_length()


def resolve_path(vocab: int) -> str:
    """``"one_pass"`` or ``"two_pass"``: the path rows of ``vocab`` columns take under :data:`KERNEL_PATH`."""
    if KERNEL_PATH not in KERNEL_PATHS:
        raise ValueError(f"KERNEL_PATH={KERNEL_PATH!r}: expected one of {KERNEL_PATHS}")
    if KERNEL_PATH != "auto":
        return KERNEL_PATH
    return "one_pass" if padded_width(vocab) <= ONE_PASS_MAX_BLOCK else "two_pass"


def _one_pass_warps(block: int) -> int:
    """Warps of a one-pass program whose row is padded to ``block`` columns."""
    return min(32, max(4, block // ONE_PASS_COLUMNS_PER_WARP))


def _multiprocessors(device: torch.device) -> int:
    """The device's multiprocessors for a persistent grid; 1 off CUDA (the interpreter on CPU tensors)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


if TRITON_AVAILABLE:
    # fmt: off
    @triton.jit
    def _one_pass_row(
        za_row, zb_row, ga_row, gb_row, kl_ab_out, kl_ba_out, V, inv_tau, ka, kb,
        HAS_GA: tl.constexpr, HAS_GB: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # fmt: on
        # the whole row (BLOCK >= V) in registers: each input read once, both gradients written from it
        cols = tl.arange(0, BLOCK)
        mask = cols < V
        xa = tl.load(za_row + cols, mask=mask, other=-float("inf")).to(tl.float32) * inv_tau
        xb = tl.load(zb_row + cols, mask=mask, other=-float("inf")).to(tl.float32) * inv_tau
        m_a = tl.max(xa, axis=0)
        m_b = tl.max(xb, axis=0)
        ea = tl.exp(xa - m_a)  # 0 at masked columns
        eb = tl.exp(xb - m_b)
        s_a = tl.sum(ea, axis=0)
        s_b = tl.sum(eb, axis=0)
        dx = tl.where(mask, xa - xb, 0.0)
        shift = (m_a + tl.log(s_a)) - (m_b + tl.log(s_b))  # lse_a - lse_b
        tl.store(kl_ab_out, tl.sum(ea * dx, axis=0) / s_a - shift)
        tl.store(kl_ba_out, shift - tl.sum(eb * dx, axis=0) / s_b)
        if HAS_GA or HAS_GB:
            diff = ea * (1.0 / s_a) - eb * (1.0 / s_b)  # p_a - p_b, without a second exp
            if HAS_GA:
                tl.store(ga_row + cols, (diff * ka).to(ga_row.dtype.element_ty), mask=mask)
            if HAS_GB:
                tl.store(gb_row + cols, (diff * kb).to(gb_row.dtype.element_ty), mask=mask)

    # fmt: off
    @triton.jit
    def _two_pass_row(
        za_row, zb_row, ga_row, gb_row, kl_ab_out, kl_ba_out, V, inv_tau, ka, kb,
        HAS_GA: tl.constexpr, HAS_GB: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # fmt: on
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
        tl.store(kl_ab_out, t_a / s_a - shift)
        tl.store(kl_ba_out, shift - t_b / s_b)

        # pass 2: gradients from p_a - p_b (re-reading the rows: from L2 when few rows are in flight)
        if HAS_GA or HAS_GB:
            for start in range(0, V, BLOCK):
                offs = start + cols
                mask = offs < V
                xa = tl.load(za_row + offs, mask=mask, other=0.0).to(tl.float32) * inv_tau
                xb = tl.load(zb_row + offs, mask=mask, other=0.0).to(tl.float32) * inv_tau
                diff = tl.exp(xa - lse_a) - tl.exp(xb - lse_b)
                if HAS_GA:
                    tl.store(ga_row + offs, (diff * ka).to(ga_row.dtype.element_ty), mask=mask)
                if HAS_GB:
                    tl.store(gb_row + offs, (diff * kb).to(gb_row.dtype.element_ty), mask=mask)

    # the arguments grouped as the launch passes them
    # fmt: off
    @triton.jit
    def _bidirectional_kl_kernel(
        za_ptr, zb_ptr, stride_za, stride_zb,
        rows_ptr,
        ga_ptr, gb_ptr, stride_ga, stride_gb,
        kl_ab_ptr, kl_ba_ptr,
        n_rows, n_programs, rows_per_program, V, inv_tau, ka, kb,
        HAS_ROWS: tl.constexpr, HAS_GA: tl.constexpr, HAS_GB: tl.constexpr, ONE_PASS: tl.constexpr,
        BLOCK: tl.constexpr,
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
                # fmt: off
                if ONE_PASS:
                    _one_pass_row(
                        za_ptr + row * stride_za, zb_ptr + row * stride_zb,
                        ga_ptr + row * stride_ga, gb_ptr + row * stride_gb, kl_ab_ptr + pid, kl_ba_ptr + pid,
                        V, inv_tau, ka, kb, HAS_GA, HAS_GB, BLOCK,
                    )
                else:
                    _two_pass_row(
                        za_ptr + row * stride_za, zb_ptr + row * stride_zb,
                        ga_ptr + row * stride_ga, gb_ptr + row * stride_gb, kl_ab_ptr + pid, kl_ba_ptr + pid,
                        V, inv_tau, ka, kb, HAS_GA, HAS_GB, BLOCK,
                    )
                # fmt: on


def bidirectional_kl_rows(za, zb, rows, inv_tau, ka, kb, grad_a, grad_b, kl_ab_rows, kl_ba_rows) -> None:
    """Same contract as ``ctcd_ds.losses.fused._torch_rows``: for each row ``r`` of ``rows`` (LongTensor on
    the device, or None = every row), ``kl_*_rows[i]`` = the row's KL values and ``grad_x[r] = (p_a - p_b) * k_x``
    for the gradients that are not None. ``za``, ``zb``: ``[N, V]`` CUDA tensors (CPU tensors under the
    interpreter); ``kl_*_rows``: float32. The path is :func:`resolve_path`'s for V."""
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
    one_pass = resolve_path(vocab) == "one_pass"
    block = padded_width(vocab) if one_pass else min(BLOCK_V, padded_width(vocab))
    programs = n
    if PROGRAMS_PER_SM is not None:
        programs = min(n, _multiprocessors(za.device) * PROGRAMS_PER_SM)
    dummy = kl_ab_rows  # any device pointer for the arguments a specialisation never reads
    # fmt: off
    _bidirectional_kl_kernel[(programs,)](
        za, zb, za.stride(0), zb.stride(0),
        rows if rows is not None else dummy,
        grad_a if grad_a is not None else dummy, grad_b if grad_b is not None else dummy,
        grad_a.stride(0) if grad_a is not None else 0, grad_b.stride(0) if grad_b is not None else 0,
        kl_ab_rows, kl_ba_rows,
        n, programs, -(-n // programs), vocab, float(inv_tau), float(ka), float(kb),
        HAS_ROWS=rows is not None, HAS_GA=grad_a is not None, HAS_GB=grad_b is not None, ONE_PASS=one_pass,
        BLOCK=block,
        num_warps=_one_pass_warps(block) if one_pass else NUM_WARPS,
    )
    # fmt: on


__all__ = [
    "BLOCK_V",
    "KERNEL_PATH",
    "KERNEL_PATHS",
    "NUM_WARPS",
    "ONE_PASS_COLUMNS_PER_WARP",
    "ONE_PASS_MAX_BLOCK",
    "PROGRAMS_PER_SM",
    "TRITON_AVAILABLE",
    "TUNING_GRID",
    "bidirectional_kl_rows",
    "kernel_path",
    "launch_name",
    "launch_settings",
    "padded_width",
    "resolve_path",
]
