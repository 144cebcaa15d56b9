"""The reference distillation loss against the hand-written formulas of GUIDE section 1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

import ctcd_ds.losses
from ctcd_ds.losses.reference import bidirectional_kd_loss, kd_loss

REPO = Path(__file__).resolve().parents[1]


def test_value_and_gradient_match_the_closed_form():
    torch.manual_seed(0)
    zs, zt = torch.randn(7, 11, dtype=torch.float64), torch.randn(7, 11, dtype=torch.float64, requires_grad=True)
    tau = 2.5
    loss = kd_loss(zs, zt, tau)
    ps, pt = torch.softmax(zs / tau, -1), torch.softmax(zt.detach() / tau, -1)
    expected = tau**2 * (ps * (ps.log() - pt.log())).sum(-1).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-7)
    loss.backward()
    torch.testing.assert_close(zt.grad, tau * (pt - ps) / 7, rtol=1e-5, atol=1e-7)


def test_source_gets_no_gradient_and_directions_are_disjoint():
    za = torch.randn(5, 9, requires_grad=True)
    zb = torch.randn(5, 9, requires_grad=True)
    a_to_b, b_to_a = bidirectional_kd_loss(za, zb, 1.0)
    a_to_b.backward()
    assert za.grad is None and zb.grad is not None
    b_to_a.backward()  # no retain_graph needed: the graphs share nothing
    assert za.grad is not None


def test_zero_rows_is_zero_not_nan():
    z = torch.zeros(0, 9, requires_grad=True)
    loss = kd_loss(torch.zeros(0, 9), z, 2.0)
    loss.backward()
    assert loss.item() == 0.0 and z.grad.shape == (0, 9)


def test_identical_distributions_give_zero():
    z = torch.randn(4, 6)
    assert kd_loss(z, z.clone().requires_grad_(), 3.0).abs().item() < 1e-6


def test_package_exports_the_public_api():
    expected = {
        "kd_loss",
        "bidirectional_kd_loss",
        "hidden_mse",
        "bidirectional_kl",
        "BidirectionalKL",
        "fused_linear_bidirectional_kl",
        "LinearBidirectionalKL",
    }
    assert set(ctcd_ds.losses.__all__) == expected
    assert all(callable(getattr(ctcd_ds.losses, name)) for name in expected)


def test_package_imports_only_torch():
    """``ctcd_ds.losses`` needs torch alone: importing it loads only its own modules and the standard library
    (triton is optional and imported only where installed)."""
    code = (
        "import sys, torch; before = set(sys.modules); import ctcd_ds.losses; "
        "print(*sorted(set(sys.modules) - before), sep=chr(10))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    loaded = res.stdout.split()
    assert "ctcd_ds.losses.fused_linear" in loaded
    others = [
        m
        for m in loaded
        if not (m == "ctcd_ds" or m.startswith("ctcd_ds.losses"))
        and m.split(".")[0].lstrip("_") not in sys.stdlib_module_names
        and m.split(".")[0] != "triton"
        and not m.startswith("_sysconfigdata")  # the standard library's sysconfig data (triton imports sysconfig)
    ]
    assert others == [], others
