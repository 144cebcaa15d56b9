"""What a pruned member runs before every optimizer step: :class:`Pruner` (HomoDistil's gradual pruning to a
target on the cubic schedule) and :class:`Sandwich` (MiniDisc's weight-shared sub-networks at several width
sparsities). Both gate the model by :class:`~ctcd_ds.pruning.masks.PruneMasks` and update its importance scores
from the (full, under ZeRO reduced) gradients."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from deepspeed.utils import safe_get_full_grad
from transformers import BertForMaskedLM

from ctcd_ds import dist
from ctcd_ds.pruning.importance import structure_scores, update_scores
from ctcd_ds.pruning.masks import PruneMasks, attach, prune_to
from ctcd_ds.pruning.schedule import cubic_kept
from ctcd_ds.pruning.widths import Widths, widths_at_sparsity, widths_of


class _Scored:
    """A member gated by masks, whose importance scores are updated from its gradients before every step."""

    def __init__(self, model: BertForMaskedLM, ema: float):
        self.model, self.masks, self.ema = model, PruneMasks(model.config), ema
        attach(model, self.masks)

    def score(self) -> None:
        """Fold this step's sensitivities into the scores; collective under ZeRO (every rank, same order)."""
        update_scores(self.masks, structure_scores(self.model, safe_get_full_grad), self.ema)


class Pruner(_Scored):
    """HomoDistil's schedule for one member: every step, fold the sensitivities of its gradients into the
    scores; between ``start_step`` and ``end_step`` (every ``every`` steps) shrink the masks to the cubic
    schedule's widths, reaching ``target`` at ``end_step``. Masks only ever shrink."""

    def __init__(self, model: BertForMaskedLM, target: Widths, start_step: int, end_step: int, every: int, ema: float):
        assert 0 <= start_step < end_step and every >= 1, (start_step, end_step, every)
        super().__init__(model, ema)
        self.full, self.target = widths_of(model.config), target
        self.start_step, self.end_step, self.every = start_step, end_step, every

    def widths_at(self, step: int) -> Widths:
        """The widths once optimizer step ``step`` (0-based) is taken."""
        progress = (step + 1 - self.start_step) / (self.end_step - self.start_step)
        full = (self.full.hidden, self.full.heads, self.full.ffn)
        target = (self.target.hidden, self.target.heads, self.target.ffn)
        return Widths(*(cubic_kept(f, t, progress) for f, t in zip(full, target)))

    def before_step(self, step: int) -> dict[str, float]:
        """Score, and prune when due; collective. Returns the kept widths (to log)."""
        self.score()
        due = step >= self.start_step and ((step - self.start_step) % self.every == 0 or step + 1 >= self.end_step)
        if due and self.masks.kept() != self.target:
            prune_to(self.masks, self.widths_at(step))
            # every rank computed the same masks from the same reduced gradients; rank 0's are the law
            for buf, value in zip(self.masks.masks(), dist.broadcast_object([m.cpu() for m in self.masks.masks()])):
                buf.copy_(value)
        kept = self.masks.kept()
        return {"kept_hidden": kept.hidden, "kept_heads": kept.heads, "kept_ffn": kept.ffn}


SANDWICH_EMA = 0.85
"""Smoothing of the importance scores that choose a sandwich member's sub-networks."""


class Sandwich(_Scored):
    """MiniDisc's sandwich training: the member also runs as weight-shared sub-networks at several width
    sparsities, each keeping its most important heads, FFN neurons and hidden dims by the running scores
    (before the first scores, ties keep the last units). The full model's masks stay all-kept."""

    def __init__(self, model: BertForMaskedLM, ema: float):
        super().__init__(model, ema)
        self._subs: dict[float, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def sub_masks(self, sparsity: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(heads, ffn, hidden) masks of the sub-network at ``sparsity``, from the current scores (cached until
        the next step's scores)."""
        if sparsity not in self._subs:
            sub = PruneMasks(self.model.config)
            sub.load_state_dict({k: v.cpu() for k, v in self.masks.state_dict().items()})
            prune_to(sub, widths_at_sparsity(self.model.config, sparsity))
            device = self.masks.heads.device
            self._subs[sparsity] = (sub.heads.to(device), sub.ffn.to(device), sub.hidden.to(device))
        return self._subs[sparsity]

    @contextmanager
    def view(self, sparsity: float):
        """Gate the model as the sub-network at ``sparsity`` inside the block (a forward builds its graph with
        copies of the masks, so swapping them back afterwards is safe)."""
        full = self.masks.masks()
        self.masks.heads, self.masks.ffn, self.masks.hidden = self.sub_masks(sparsity)
        try:
            yield
        finally:
            self.masks.heads, self.masks.ffn, self.masks.hidden = full

    def before_step(self, step: int) -> dict[str, float]:
        self.score()
        self._subs.clear()
        return {}
