"""Model FLOPs and MFU (model FLOPs utilisation): how much of the devices' peak a run turns into model arithmetic.

Model FLOPs count the matrix multiplications the model itself needs for a trained token, not what the
hardware ends up doing (no activation recompute, no optimizer, no KD loss, no masks of a pruned member), so
MFU compares runs and devices fairly. Imports nothing that imports DeepSpeed.
"""

from __future__ import annotations

import re

import torch

# Dense (no sparsity) peaks per device in TFLOP/s: (name pattern, bf16/fp16 tensor cores, fp32 without TF32).
# The first pattern that matches torch.cuda.get_device_name() wins, so a variant comes before its family.
PEAKS: tuple[tuple[str, float, float | None], ...] = (
    (r"H(100|800).*PCIe", 756, 51),
    (r"H100.*NVL", 835, 60),
    (r"H200.*NVL", 836, 60),
    (r"H100|H200|H800", 989, 67),  # SXM (e.g. "NVIDIA H100 80GB HBM3"), GH200
    (r"A100|A800", 312, 19.5),
    (r"L40S", 362, 91.6),
    (r"L40\b", 181, 90.5),
    (r"A10G", 70, 35),
    (r"A10\b", 125, 31.2),
    (r"L4\b", 121, 30.3),
    (r"V100.*PCIE", 112, 14),
    (r"V100", 125, 15.7),  # fp16 only: Volta has no bf16
    (r"T4\b", 65, 8.1),
)


def flops_per_token(
    config, seq_len: int, head_fraction: float, *, trainable: bool = True, head_outputs: int | None = None
) -> float:
    """Model FLOPs per token of one member of a BERT-style encoder, forward and backward when ``trainable``.

    With L layers, hidden h, attention width a (heads x head size, = h in BERT), FFN f, sequence length s and
    V head outputs, per token (a multiply-add is 2 FLOPs)::

        layer   = 2 * (3ha + ah + 2hf)        QKV and output projections, FFN in and out
                + 2 * 2sa                     attention scores (QK^T) and values (AV), over all s positions
        head    = 2 * (h^2 + hV)              MLM head: transform + decoder
        forward = L * layer + head_fraction * head
        total   = 3 * forward                 backward = 2 x forward; a frozen member (trainable=False): 1 x

    The head runs only on ``head_fraction`` of the positions: the masked ones in pre-training
    (``data.mlm_probability``, an upper bound: special tokens are never masked). Embedding lookups, LayerNorm,
    softmax and biases are left out (under 1% for BERT-base). ``config`` is the member's transformers config
    (``num_hidden_layers``, ``hidden_size``, ``num_attention_heads``, ``intermediate_size``, ``vocab_size``);
    ``head_outputs`` replaces ``vocab_size`` (e.g. a classifier's labels). ValueError if a field is missing.
    """
    try:
        layers, h, f = config.num_hidden_layers, config.hidden_size, config.intermediate_size
        heads = config.num_attention_heads
        outputs = config.vocab_size if head_outputs is None else head_outputs
    except AttributeError as exc:
        raise ValueError(f"{type(config).__name__} is not a BERT-style config: {exc}") from exc
    a = heads * (h // heads)
    layer = 2 * (3 * h * a + a * h + 2 * h * f) + 2 * 2 * seq_len * a
    head = 2 * (h * h + h * outputs)
    forward = layers * layer + head_fraction * head
    return (3 if trainable else 1) * forward


def device_peak_tflops(precision: str, device_name: str | None = None) -> float | None:
    """The dense peak TFLOP/s of one device at ``precision`` (bf16, fp16 or fp32) from :data:`PEAKS`, or None
    when unknown (on the CPU, an unlisted GPU, fp32 where no figure is listed). ``device_name``: by default
    ``torch.cuda.get_device_name()``."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    for pattern, half, fp32 in PEAKS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return half if precision in ("bf16", "fp16") else fp32
    return None


def peak_tflops(setting: float, precision: str, device_name: str | None = None) -> float | None:
    """One device's peak TFLOP/s: ``train.peak_tflops`` when set (> 0), else :func:`device_peak_tflops`."""
    return setting if setting > 0 else device_peak_tflops(precision, device_name)


def model_tflops(tokens_per_s: float, flops_per_token: float) -> float:
    """Achieved model TFLOP/s."""
    return tokens_per_s * flops_per_token / 1e12


def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops: float, devices: int = 1) -> float:
    """Model FLOPs utilisation (a fraction): the model TFLOP/s of ``tokens_per_s`` (over all ``devices``)
    divided by ``devices`` x one device's ``peak_tflops``."""
    return model_tflops(tokens_per_s, flops_per_token) / (peak_tflops * devices)
