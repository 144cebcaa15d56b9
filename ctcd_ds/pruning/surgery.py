"""Physical removal: :func:`prune_bert` builds a standard, genuinely smaller ``BertForMaskedLM`` holding the
kept rows and columns of a masked one (see :mod:`ctcd_ds.pruning.widths` for the shapes BERT allows)."""

from __future__ import annotations

import torch
from transformers import BertForMaskedLM

from ctcd_ds.pruning.masks import PruneMasks
from ctcd_ds.pruning.widths import pruned_config


def prune_bert(model: BertForMaskedLM, masks: PruneMasks) -> BertForMaskedLM:
    """A new, smaller ``BertForMaskedLM`` holding the kept rows/columns of ``model`` (fp32, eval mode)."""
    kept = masks.kept()
    d = masks.head_dim
    if kept.heads * d != kept.hidden:
        raise ValueError(
            f"cannot build a BERT with hidden size {kept.hidden} and {kept.heads} heads of {d}: pruning has not "
            "reached "
            f"its target yet (hidden must equal heads x {d}); export after members.NAME.prune.end"
        )
    for name, mask in (("heads", masks.heads), ("ffn", masks.ffn)):
        counts = mask.sum(1)
        assert bool((counts == counts[0]).all()), (name, counts.tolist())  # uniform per layer by construction
    hid = masks.hidden.nonzero().squeeze(1).cpu()
    src = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    layers = model.config.num_hidden_layers

    def take(name: str, *dims: torch.Tensor | None) -> None:
        t = src[name]
        for axis, idx in enumerate(dims):
            if idx is not None:
                t = t.index_select(axis, idx)
        out[name] = t.contiguous()

    e = "bert.embeddings."
    for table in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        take(f"{e}{table}.weight", None, hid)
    for p in ("weight", "bias"):
        take(f"{e}LayerNorm.{p}", hid)
    for i in range(layers):
        head_rows = masks.heads[i].cpu().repeat_interleave(d).nonzero().squeeze(1)
        neurons = masks.ffn[i].nonzero().squeeze(1).cpu()
        p = f"bert.encoder.layer.{i}."
        for qkv in ("query", "key", "value"):
            take(f"{p}attention.self.{qkv}.weight", head_rows, hid)
            take(f"{p}attention.self.{qkv}.bias", head_rows)
        take(f"{p}attention.output.dense.weight", hid, head_rows)
        take(f"{p}attention.output.dense.bias", hid)
        take(f"{p}intermediate.dense.weight", neurons, hid)
        take(f"{p}intermediate.dense.bias", neurons)
        take(f"{p}output.dense.weight", hid, neurons)
        take(f"{p}output.dense.bias", hid)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            for q in ("weight", "bias"):
                take(f"{p}{ln}.{q}", hid)
    h = "cls.predictions."
    take(f"{h}transform.dense.weight", hid, hid)
    take(f"{h}transform.dense.bias", hid)
    for q in ("weight", "bias"):
        take(f"{h}transform.LayerNorm.{q}", hid)
    take(f"{h}bias")
    if f"{h}decoder.weight" in src:
        take(f"{h}decoder.weight", None, hid)
    if f"{h}decoder.bias" in src:
        take(f"{h}decoder.bias")
    cfg = pruned_config(model.config, kept)
    cfg.tie_word_embeddings = model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    small = BertForMaskedLM(cfg)
    missing, unexpected = small.load_state_dict(out, strict=False)
    missing = [k for k in missing if not k.endswith("decoder.weight") and not k.endswith("decoder.bias")]  # tied
    assert not missing and not unexpected, (missing, unexpected)
    return small.eval()
