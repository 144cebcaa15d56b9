"""Model presets and what a member's `model` setting names (a preset or a pretrained directory).

Shape arithmetic only: importing this never builds a model, so config checks can use it."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import AutoConfig, BertConfig, PretrainedConfig


@dataclass(frozen=True, slots=True)
class Preset:
    layers: int
    hidden: int
    heads: int
    ffn: int
    max_positions: int = 512
    note: str = ""


PRESETS: dict[str, Preset] = {
    "tiny-teacher": Preset(4, 256, 4, 1024, note="CPU default teacher (~3M params + embeddings)"),
    "tiny-student": Preset(2, 128, 2, 512, note="CPU default student"),
    "ratio-teacher": Preset(6, 256, 4, 1024, note="6L-256: the papers' depth ratio (6 -> 4 layers) at a CPU width"),
    "ratio-student": Preset(4, 256, 4, 1024, note="4L-256 (~0.77x ratio-teacher's parameters, bundled vocabulary)"),
    "paper-teacher": Preset(6, 768, 12, 3072, note="6L-768, the DWT/CTCD papers' larger model (~67M)"),
    "paper-student": Preset(4, 768, 12, 3072, note="4L-768, the papers' smaller model (~52M)"),
    "bert-base": Preset(12, 768, 12, 3072, note="BERT-base shape (12L-768)"),
    "bert-large": Preset(24, 1024, 16, 4096, note="BERT-large shape (24L-1024)"),
}


def is_pretrained_path(model: str) -> bool:
    return model not in PRESETS


def weight_dirs(members) -> dict[str, str]:
    """Every pretrained directory a run reads weights from: ``{flag: dir}`` over members' model and init_from."""
    out = {}
    for name, m in members.items():
        if is_pretrained_path(m.model):
            out[f"members.{name}.model"] = m.model
        if getattr(m, "init_from", ""):
            out[f"members.{name}.init_from"] = m.init_from
    return out


def model_config(model: str, vocab_size: int, pad_token_id: int) -> PretrainedConfig:
    """The transformers config of a preset (for ``vocab_size``) or of a model directory."""
    if is_pretrained_path(model):
        return AutoConfig.from_pretrained(model)
    p = PRESETS[model]
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=p.hidden,
        num_hidden_layers=p.layers,
        num_attention_heads=p.heads,
        intermediate_size=p.ffn,
        max_position_embeddings=p.max_positions,
        pad_token_id=pad_token_id,
    )


def remap_problems(flag: str, target: PretrainedConfig, source: PretrainedConfig) -> list[str]:
    """Why ``source`` weights cannot initialise a ``target``-shaped model by layer remapping (empty if they can)."""
    problems = []
    for attr in ("hidden_size", "intermediate_size", "vocab_size", "max_position_embeddings"):
        a, b = getattr(target, attr, None), getattr(source, attr, None)
        if a != b:
            problems.append(
                f"{flag}: the source model's {attr}={b} differs from this member's {attr}={a}; "
                "remapping copies whole layers, so they must match"
            )
    return problems
