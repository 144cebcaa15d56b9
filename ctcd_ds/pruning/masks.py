"""Pruning masks while training: :class:`PruneMasks` and the forward hooks that gate a BERT by them.

:class:`PruneMasks` holds bool masks (buffers, so they are saved in every DeepSpeed checkpoint) and the smoothed
importance scores; :func:`attach` hooks them into the model: a pruned head's context is zeroed before the output
projection, a pruned FFN neuron's activation is zeroed, and every LayerNorm normalises over the kept hidden dims
only and outputs 0 on the pruned ones. So the masked model computes exactly what the physically smaller model
computes (:func:`ctcd_ds.pruning.surgery.prune_bert`, tested to float precision), and pruned structures receive
zero gradients. :func:`prune_to` shrinks masks to target widths by the scores.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM

from ctcd_ds.pruning.widths import Widths, head_dim, widths_of


class PruneMasks(nn.Module):
    """Masks (bool, True = kept) and smoothed importance scores of one BERT, as buffers."""

    def __init__(self, config: BertConfig):
        super().__init__()
        layers, w = config.num_hidden_layers, widths_of(config)
        self.head_dim = head_dim(config)
        self.register_buffer("heads", torch.ones(layers, w.heads, dtype=torch.bool))
        self.register_buffer("ffn", torch.ones(layers, w.ffn, dtype=torch.bool))
        self.register_buffer("hidden", torch.ones(w.hidden, dtype=torch.bool))
        self.register_buffer("head_scores", torch.zeros(layers, w.heads, dtype=torch.float32))
        self.register_buffer("ffn_scores", torch.zeros(layers, w.ffn, dtype=torch.float32))
        self.register_buffer("hidden_scores", torch.zeros(w.hidden, dtype=torch.float32))
        self.register_buffer("scored_steps", torch.zeros((), dtype=torch.long))

    def hidden_all_kept(self) -> bool:
        """Whether no hidden dim is pruned; cached per version of the ``hidden`` tensor (no device sync per call)."""
        key = (id(self.hidden), self.hidden._version)
        if getattr(self, "_all_kept_key", None) != key:
            self._all_kept_key, self._all_kept = key, bool(self.hidden.all())
        return self._all_kept

    def kept(self) -> Widths:
        """Current per-layer sizes (heads and FFN neurons are pruned uniformly over layers)."""
        return Widths(int(self.hidden.sum()), int(self.heads[0].sum()), int(self.ffn[0].sum()))

    def masks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.heads, self.ffn, self.hidden


def masked_layer_norm(x: torch.Tensor, ln: nn.LayerNorm, keep: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the kept dims of ``x`` only (statistics included), 0 on the pruned dims: what the
    LayerNorm of the physically pruned model computes, embedded back at full width. Math in float32."""
    m = keep.to(torch.float32)
    xf = x.float()
    n = m.sum()
    mean = (xf * m).sum(-1, keepdim=True) / n
    centred = (xf - mean) * m
    var = (centred * centred).sum(-1, keepdim=True) / n
    y = centred * torch.rsqrt(var + ln.eps) * ln.weight.float() + ln.bias.float()
    return (y * m).to(x.dtype)


def _layer_norms(model: BertForMaskedLM) -> list[nn.LayerNorm]:
    bert = model.bert
    lns = [bert.embeddings.LayerNorm, model.cls.predictions.transform.LayerNorm]
    for layer in bert.encoder.layer:
        lns += [layer.attention.output.LayerNorm, layer.output.LayerNorm]
    return lns


def attach(model: BertForMaskedLM, masks: PruneMasks) -> list:
    """Hook ``masks`` into ``model`` (see the module docstring); returns the hook handles.

    The hooks read the buffers through ``masks`` at every call, so they follow the module when DeepSpeed
    moves or converts it."""
    handles = []
    for i, layer in enumerate(model.bert.encoder.layer):

        def head_gate(module, args, i=i):
            keep = masks.heads[i].repeat_interleave(masks.head_dim).to(args[0].dtype)
            return (args[0] * keep, *args[1:])

        def ffn_gate(module, args, output, i=i):
            return output * masks.ffn[i].to(output.dtype)

        handles.append(layer.attention.output.register_forward_pre_hook(head_gate))
        handles.append(layer.intermediate.register_forward_hook(ffn_gate))

    def ln_gate(module, args, output):
        return output if masks.hidden_all_kept() else masked_layer_norm(args[0], module, masks.hidden)

    for ln in _layer_norms(model):
        handles.append(ln.register_forward_hook(ln_gate))
    return handles


def prune_lowest(keep: torch.Tensor, scores: torch.Tensor, count: int) -> None:
    """In place: keep only the ``count`` highest-scoring of the units ``keep`` still keeps (1-d)."""
    current = int(keep.sum())
    if count >= current:
        return
    ranked = torch.where(keep, scores.float(), torch.tensor(math.inf))
    drop = torch.argsort(ranked, stable=True)[: current - count]
    keep[drop] = False


def prune_to(masks: PruneMasks, target: Widths) -> None:
    """Shrink the masks to ``target`` by the smoothed scores (per layer for heads and FFN neurons)."""
    with torch.no_grad():
        for i in range(masks.heads.shape[0]):
            prune_lowest(masks.heads[i], masks.head_scores[i], target.heads)
            prune_lowest(masks.ffn[i], masks.ffn_scores[i], target.ffn)
        prune_lowest(masks.hidden, masks.hidden_scores, target.hidden)
