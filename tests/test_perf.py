"""Model FLOPs and MFU (ctcd_ds.perf): a hand count for BERT-base, the device peak table, and a real run's scalars."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, BertConfig

from ctcd_ds import checks, perf
from ctcd_ds.config import load_config

from conftest import read_metrics, run

BERT_BASE = BertConfig(
    vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
)

# BERT-base, s = 128, V = 30522, 15% of the positions predicted; per token, multiply-adds (MACs) first:
#   QKV 3 * 768 * 768 = 1,769,472; output projection 768 * 768 = 589,824; FFN 2 * 768 * 3072 = 4,718,592
#   -> 7,077,888 MACs = 14,155,776 FLOPs per layer
#   attention scores 128 * 768 = 98,304 MACs, values 98,304 MACs -> 393,216 FLOPs per layer
#   12 layers: 12 * (14,155,776 + 393,216) = 174,587,904
#   MLM head 768 * 768 + 768 * 30522 = 24,030,720 MACs = 48,061,440 FLOPs, on 15% of the tokens: 7,209,216
FORWARD = 174_587_904 + 7_209_216  # 181,797,120
TRAINED = 3 * FORWARD  # 545,391,360: forward + backward (about 6 x the 85M non-embedding parameters, plus)


def test_bert_base_matches_the_hand_count():
    assert perf.flops_per_token(BERT_BASE, 128, 0.15) == pytest.approx(545_391_360, rel=1e-12)
    assert perf.flops_per_token(BERT_BASE, 128, 0.15) == pytest.approx(TRAINED, rel=1e-12)


def test_a_frozen_member_costs_its_forward_only():
    assert perf.flops_per_token(BERT_BASE, 128, 0.15, trainable=False) == pytest.approx(181_797_120, rel=1e-12)


def test_a_config_without_a_bert_shape_is_refused():
    with pytest.raises(ValueError, match="not a BERT-style config"):
        perf.flops_per_token(object(), 128, 0.15)


@pytest.mark.parametrize(
    "name, precision, peak",
    [
        ("NVIDIA A100-SXM4-80GB", "bf16", 312),
        ("NVIDIA A100 80GB PCIe", "fp16", 312),
        ("NVIDIA A100-SXM4-40GB", "fp32", 19.5),
        ("NVIDIA H100 80GB HBM3", "bf16", 989),
        ("NVIDIA H100 PCIe", "bf16", 756),
        ("NVIDIA H200", "bf16", 989),
        ("NVIDIA L40S", "bf16", 362),
        ("NVIDIA L40", "bf16", 181),
        ("NVIDIA A10G", "bf16", 70),
        ("NVIDIA A10", "bf16", 125),
        ("NVIDIA L4", "bf16", 121),
        ("Tesla V100-SXM2-32GB", "fp16", 125),
        ("NVIDIA GeForce GTX 1080", "bf16", None),
    ],
)
def test_device_peak_from_the_table(monkeypatch, name, precision, peak):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: name)
    assert perf.device_peak_tflops(precision) == peak
    assert perf.peak_tflops(0.0, precision) == peak


def test_no_peak_on_the_cpu_unless_set(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert perf.device_peak_tflops("fp32") is None
    assert perf.peak_tflops(0.0, "fp32") is None
    assert perf.peak_tflops(250.0, "fp32") == 250.0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H100 80GB HBM3")
    assert perf.peak_tflops(500.0, "bf16") == 500.0  # the setting wins over the table


def test_mfu_arithmetic():
    # 100,000 tokens/s x 545,391,360 FLOPs = 54.539136 TFLOP/s, on 2 devices of 312: 54.539136 / 624
    assert perf.model_tflops(100_000, TRAINED) == pytest.approx(54.539136, rel=1e-12)
    assert perf.mfu(100_000, TRAINED, 312, devices=2) == pytest.approx(0.0874024615384615, rel=1e-12)
    assert perf.mfu(100_000, TRAINED, 312) == pytest.approx(0.174804923076923, rel=1e-12)


def test_peak_tflops_must_not_be_negative():
    problems = checks.problems(load_config("ctcd", ["--train.peak_tflops=-1"]))
    assert "train.peak_tflops=-1.0: must be >= 0 (0 = look the device up)" in problems
    assert not [p for p in checks.problems(load_config("ctcd", ["--train.peak_tflops=312"])) if "peak" in p]


def _tiny_pair_flops(run_dir) -> float:
    """The tiny teacher and student, both trained, on the fixture's 64-token blocks."""
    configs = [AutoConfig.from_pretrained(run_dir / "export" / n) for n in ("teacher", "student")]
    return sum(perf.flops_per_token(c, 64, 0.15) for c in configs)


@pytest.mark.parametrize("peak", [0, 40])
def test_a_run_logs_model_tflops_and_mfu(tiny, peak, monkeypatch):
    monkeypatch.setattr(perf, "device_peak_tflops", lambda *_: None)  # an unlisted device, even on a GPU
    short = ["--train.steps=2", "--train.eval_every=0", "--checkpoint.every=0"]
    summary, run_dir = run([*tiny, *short, f"--train.peak_tflops={peak}"])
    logged = [m for m in read_metrics(run_dir) if "perf/tokens_per_s" in m]
    assert [m["step"] for m in logged] == [1, 2]
    flops = _tiny_pair_flops(run_dir)
    for m in logged:
        assert m["perf/model_tflops"] == pytest.approx(m["perf/tokens_per_s"] * flops / 1e12, rel=1e-9)
        if peak:
            assert m["perf/mfu"] == pytest.approx(m["perf/model_tflops"] / peak, rel=1e-9)
        else:  # no peak known
            assert "perf/mfu" not in m
    assert summary["model_tflops"] == pytest.approx(summary["tokens_per_s"] * flops / 1e12, rel=1e-9)
    assert summary["mfu"] == (pytest.approx(summary["model_tflops"] / peak, rel=1e-9) if peak else None)
