"""Shape arithmetic of structured pruning on a ``BertConfig``: per-layer widths, pruning targets, pruned configs.

BERT's config has no separate head size (``head_dim = hidden_size / num_attention_heads``), so every layer keeps
the same number of heads and neurons, and a pruned hidden size must equal the kept heads times the original head
size: e.g. 4L-256 (4 heads of 64, FFN 1024) -> 4L-128 (2 heads of 64, FFN 512).

Config validation imports this module: it must not import DeepSpeed, directly or through ``ctcd_ds.dist``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from transformers import BertConfig


@dataclass(frozen=True, slots=True)
class Widths:
    """Per-layer sizes of a (pruned) BERT: hidden width, attention heads, FFN neurons."""

    hidden: int
    heads: int
    ffn: int

    def __str__(self) -> str:
        return f"hidden {self.hidden}, {self.heads} heads, FFN {self.ffn}"


def widths_of(config: BertConfig) -> Widths:
    return Widths(config.hidden_size, config.num_attention_heads, config.intermediate_size)


def head_dim(config: BertConfig) -> int:
    return config.hidden_size // config.num_attention_heads


def target_widths(config: BertConfig, hidden: int, ffn: int) -> Widths:
    """The widths a pruning target means for ``config``: heads follow from ``hidden / head_dim``."""
    return Widths(hidden, hidden // head_dim(config), ffn)


def target_problems(flag: str, config: BertConfig, hidden: int, ffn: int) -> list[str]:
    """Why ``(hidden, ffn)`` is not a reachable pruning target of ``config`` (empty if it is)."""
    if getattr(config, "model_type", "bert") != "bert":
        return []  # reported once, by the caller's model-type check
    problems = []
    d = head_dim(config)
    if not 0 < hidden <= config.hidden_size:
        problems.append(f"{flag}.hidden_size={hidden}: must be in 1..{config.hidden_size} (the model's hidden size)")
    elif hidden % d:
        problems.append(
            f"{flag}.hidden_size={hidden}: must be a multiple of the head size {d} (BERT's head size is "
            f"hidden_size / num_attention_heads, so the pruned model keeps hidden_size / {d} heads of {d})"
        )
    if not 0 < ffn <= config.intermediate_size:
        problems.append(
            f"{flag}.intermediate_size={ffn}: must be in 1..{config.intermediate_size} (the model's FFN size)"
        )
    return problems


def widths_at_sparsity(config: BertConfig, sparsity: float) -> Widths:
    """Per-layer widths that keep ``1 - sparsity`` of the heads (so of the hidden width, ``heads x head size``)
    and of the FFN neurons, at least one of each."""
    full = widths_of(config)
    heads = max(1, round(full.heads * (1 - sparsity)))
    return Widths(heads * head_dim(config), heads, max(1, round(full.ffn * (1 - sparsity))))


def pruned_config(config: BertConfig, kept: Widths) -> BertConfig:
    cfg = copy.deepcopy(config)
    cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size = kept.hidden, kept.heads, kept.ffn
    return cfg
