"""Derive each engine's DeepSpeed config from a ZeRO template and the run config (no DeepSpeed import).

Templates hold only ZeRO tuning; every per-run value (batch, accumulation, clipping, precision) comes
from the run config, so it lives in exactly one place. A template that sets one is rejected.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from typing import Any

from ctcd_ds.assets import templates_dir
from ctcd_ds.errors import UserError

RUN_OWNED_KEYS = {
    "train_batch_size": "train.micro_batch_size x train.grad_accum_steps x ranks",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "gradient_clipping": "train.grad_clip",
    "fp16": "train.precision",
    "bf16": "train.precision",
    "optimizer": "members.NAME.lr / weight_decay / beta1 / beta2",
    "scheduler": "members.NAME.warmup_ratio / lr_schedule",
}


MONITOR_KEYS = ("tensorboard", "csv_monitor", "wandb", "comet")
"""DeepSpeed's monitor blocks. No engine gets one (each would log only its own lr, every engine into the same
job); the run's monitor writes every member's scalars to the csv_monitor, wandb and comet a template enables."""


def enabled_monitors(tmpl: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The monitor blocks a template enables, by key."""
    return {k: tmpl[k] for k in MONITOR_KEYS if isinstance(tmpl.get(k), dict) and tmpl[k].get("enabled")}


def _monitor_problems(flag: str, tmpl: dict[str, Any]) -> list[str]:
    problems = []
    monitors = enabled_monitors(tmpl)
    if "tensorboard" in monitors:
        problems.append(
            f"{flag}: enables DeepSpeed's tensorboard monitor; every member's scalars already go to "
            "<output_dir>/tensorboard: remove the block (csv_monitor, wandb and comet blocks are fed by the run)"
        )
    for key, package in (("wandb", "wandb"), ("comet", "comet_ml")):
        if key in monitors and importlib.util.find_spec(package) is None:
            problems.append(
                f"{flag}: enables the {key} monitor, which needs the {package} package (pip install {package})"
            )
    return problems


def template_names() -> list[str]:
    return sorted(p.stem for p in templates_dir().glob("*.json"))


def template_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".json" or path.is_file():
        return path
    return templates_dir() / f"{name_or_path}.json"


def template_problems(name_or_path: str) -> list[str]:
    """Everything wrong with a template, as one line each (empty if it is usable)."""
    flag = f"deepspeed.template={name_or_path}"
    path = template_path(name_or_path)
    if not path.is_file():
        return [f"{flag}: no such file (shipped templates: {', '.join(template_names())})"]
    try:
        tmpl = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        return [f"{flag}: not valid JSON: {exc}"]
    if not isinstance(tmpl, dict):
        return [f"{flag}: expected a JSON object"]
    problems = [
        f"{flag}: sets '{k}', which comes from the run config ({v}); remove it from the template"
        for k, v in RUN_OWNED_KEYS.items()
        if k in tmpl
    ]
    problems += _monitor_problems(flag, tmpl)
    stage = tmpl.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        problems.append(f"{flag}: zero_optimization.stage={stage!r} is not a ZeRO stage (0, 1, 2 or 3)")
    return problems


def load_template(name_or_path: str) -> dict[str, Any]:
    problems = template_problems(name_or_path)
    if problems:
        raise UserError(problems)
    return json.loads(template_path(name_or_path).read_text())


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds: dict[str, Any]) -> bool:
    return ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none"


def engine_config(
    template: str,
    *,
    micro_batch_size: int,
    grad_accum_steps: int,
    grad_clip: float,
    trainable: bool,
    precision: str,
    load_universal: bool = False,
) -> dict[str, Any]:
    """The DeepSpeed config of one member's engine: the template plus the run's own values.

    Frozen members get no optimizer: ZeRO-3 (parameters partitioned) when the run uses ZeRO-3,
    otherwise stage 0 (ZeRO stages 1-2 only shard optimizer state and gradients, which they lack).
    ``load_universal``: the engine will load a DeepSpeed universal checkpoint (resuming on another world size).
    """
    ds = copy.deepcopy(load_template(template))
    for key in MONITOR_KEYS:
        ds.pop(key, None)
    ds.update(
        train_micro_batch_size_per_gpu=micro_batch_size,
        gradient_accumulation_steps=grad_accum_steps,
        steps_per_print=10**9,
        wall_clock_breakdown=False,
    )
    if trainable:
        ds["gradient_clipping"] = grad_clip
        if load_universal:
            ds.setdefault("checkpoint", {})["load_universal"] = True
    else:
        zero = ds.get("zero_optimization", {})
        if zero.get("stage", 0) == 3:
            zero.pop("offload_optimizer", None)
        else:
            ds["zero_optimization"] = {"stage": 0}
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif precision == "fp16":
        ds["fp16"] = {
            "enabled": True,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    else:
        assert precision == "fp32", precision
    return ds
