"""Building members' models, and the sparse-prediction wrapper each pre-training engine holds."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForMaskedLM, BertForMaskedLM, PreTrainedModel

from ctcd_ds.errors import UserError
from ctcd_ds.presets import is_pretrained_path, model_config, remap_problems
from ctcd_ds.pruning.masks import PruneMasks
from ctcd_ds.pruning.training import Pruner, Sandwich


def build_model(model: str, vocab_size: int, pad_token_id: int) -> PreTrainedModel:
    """A freshly initialised preset, or the pretrained weights in a directory (fp32)."""
    if is_pretrained_path(model):
        return AutoModelForMaskedLM.from_pretrained(model, dtype=torch.float32)
    return BertForMaskedLM(model_config(model, vocab_size, pad_token_id))


def mlm_head(model: PreTrainedModel) -> nn.Module:
    """The prediction head (transform + decoder) of a masked LM."""
    for name in ("cls", "lm_head"):
        head = getattr(model, name, None)
        if head is not None:
            return head
    raise UserError(f"model {type(model).__name__} has no MLM head named 'cls' or 'lm_head'")


class SparseMLM(nn.Module):
    """Wraps a masked LM so its forward returns logits at the masked positions only.

    The encoder runs on the whole block; the hidden states of the masked positions are gathered
    first and only they go through the LM head (DeepSpeed's BERT examples do the same), which
    removes most of the head's compute and memory. This module is what each DeepSpeed engine holds.

    With a ``structure`` (``ctcd_ds.pruning``: a HomoDistil ``Pruner`` or a MiniDisc ``Sandwich``) the model
    is gated by masks whose buffers live here as ``masks`` (``masks.*`` in the engine's checkpoints); a
    pruned member exports as the physically smaller model.
    """

    def __init__(self, mlm: PreTrainedModel, structure: Pruner | Sandwich | None = None):
        super().__init__()
        self.hf = mlm
        mlm_head(mlm)  # fail early on a model without an MLM head
        self.structure = structure
        self.masks = structure.masks if structure is not None else None

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, predict: torch.Tensor, view: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``predict``: the flat indices (into batch x seq, row-major) of the positions to predict -> (logits
        [n_predict, vocab], last hidden states [n_predict, hidden]). ``attention_mask`` None: no padding.
        ``view`` > 0: as the sandwich sub-network at that sparsity."""
        with self.structure.view(view) if view else contextlib.nullcontext():
            states = self.hf.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            hidden = states.flatten(0, 1).index_select(0, predict)
            return mlm_head(self.hf)(hidden), hidden

    @property
    def pruned_masks(self) -> PruneMasks | None:
        """The masks to export by (physical removal) when this member is pruned while training, else None."""
        return self.masks if isinstance(self.structure, Pruner) else None

    def hidden_keep(self, view: float = 0.0) -> torch.Tensor | None:
        """The hidden dims this model (or its sub-network ``view``) keeps (bool), or None when it has no masks."""
        if view:
            return self.structure.sub_masks(view)[2]
        return self.masks.hidden if self.masks is not None else None

    def before_optimizer_step(self, step: int) -> dict[str, float]:
        """Called by the training loop at every accumulation boundary before the engine steps, on every rank
        (collective under ZeRO); returns scalars to log."""
        return self.structure.before_step(step) if self.structure is not None else {}


def remap_init(model: PreTrainedModel, source_dir: str) -> list[int]:
    """Initialise ``model`` from the smaller model in ``source_dir``: embeddings, MLM head and
    encoder layers 1..k are copied, the last source layer fills every extra layer (DWT's parameter
    remapping). Returns, for each layer of ``model``, the source layer it was copied from."""
    source = AutoModelForMaskedLM.from_pretrained(source_dir, dtype=torch.float32)
    problems = remap_problems(f"init_from={source_dir}", model.config, source.config)
    if problems:
        raise UserError(problems)
    src_layers = source.base_model.encoder.layer
    dst_layers = model.base_model.encoder.layer
    mapping = [min(i, len(src_layers) - 1) for i in range(len(dst_layers))]
    with torch.no_grad():
        model.base_model.embeddings.load_state_dict(source.base_model.embeddings.state_dict())
        for dst, src in zip(dst_layers, mapping):
            dst.load_state_dict(src_layers[src].state_dict())
        mlm_head(model).load_state_dict(mlm_head(source).state_dict())
    return mapping


def count_parameters(model: nn.Module) -> int:
    """All parameters of ``model``, whole: under ZeRO-3 a partitioned parameter counts its full size (``ds_numel``)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def parameters_of(model: str, vocab_size: int, pad_token_id: int) -> int:
    """The parameter count of a preset or model directory, without building its weights (meta device)."""
    with torch.device("meta"):
        return count_parameters(AutoModelForMaskedLM.from_config(model_config(model, vocab_size, pad_token_id)))


def save_hf(model: PreTrainedModel, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
    """``save_pretrained`` with the given (full, fp32) weights."""
    model.save_pretrained(out_dir, state_dict={k: v.float().contiguous() for k, v in state_dict.items()})
