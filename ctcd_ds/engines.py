"""Wrap every member in its own DeepSpeed engine (own optimizer and lr schedule; none when frozen)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.ops.adam import DeepSpeedCPUAdam

from ctcd_ds import ds_config
from ctcd_ds.config import MemberConfig
from ctcd_ds.errors import UserError


def resolve_precision(requested: str) -> str:
    """``auto`` -> bf16 on accelerators that support it, else fp32; fp16/bf16 need an accelerator."""
    acc = get_accelerator()
    on_cpu = acc.device_name() == "cpu"
    if requested == "auto":
        return "bf16" if not on_cpu and acc.is_bf16_supported() else "fp32"
    if requested in ("fp16", "bf16") and on_cpu:
        raise UserError(f"train.precision={requested}: needs a GPU; DeepSpeed runs on the CPU here (use fp32 or auto)")
    return requested


def lr_lambda(schedule: str, warmup: int, total: int):
    """Multiplier of the peak lr at a step: linear warm-up, then linear/cosine decay to 0 or constant."""
    assert schedule in ("linear", "cosine", "constant"), schedule

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _optimizer(model: torch.nn.Module, m: MemberConfig, *, offload: bool, fused: bool) -> torch.optim.Optimizer:
    groups = _param_groups(model, m.weight_decay)
    if offload:  # ZeRO-Offload steps on the CPU with DeepSpeed's CPU Adam (JIT-built on first use)
        return DeepSpeedCPUAdam(groups, lr=m.lr, betas=(m.beta1, m.beta2), adamw_mode=True)
    return torch.optim.AdamW(groups, lr=m.lr, betas=(m.beta1, m.beta2), fused=fused)


@dataclass
class Member:
    """A member of the run and its engine."""

    name: str
    cfg: MemberConfig
    engine: Any  # deepspeed.DeepSpeedEngine

    @property
    def trainable(self) -> bool:
        return self.cfg.trainable


def build_engine(
    name: str,
    model: torch.nn.Module,
    m: MemberConfig,
    ds: dict[str, Any],
    total_steps: int,
    *,
    fused_optimizer: bool = True,
    compile: bool = False,
) -> Member:
    """``deepspeed.initialize`` one member with its DeepSpeed config ``ds`` (see ``ds_config.engine_config``);
    ``fused_optimizer``: torch's fused AdamW (``train.fused_optimizer``); ``compile``: ``torch.compile`` the
    model in place (``train.compile``: ``engine.module`` stays the model, its state-dict keys unchanged)."""
    if not m.trainable:
        model.requires_grad_(False)
        engine, *_ = deepspeed.initialize(model=model, config=ds)
        engine.eval()
        if compile:
            engine.compile(backend=get_accelerator().get_compile_backend())
        return Member(name, m, engine)
    optimizer = _optimizer(model, m, offload=ds_config.offloads_optimizer(ds), fused=fused_optimizer)
    warmup = int(m.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(m.lr_schedule, warmup, total_steps))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
    engine.train()
    if compile:
        engine.compile(backend=get_accelerator().get_compile_backend())
    return Member(name, m, engine)
